"""Staging is disposable and resume is exact: the images stage against a real server on
127.0.0.1, crashed after its first staged chunk, then rerun after what users do in between
(change the download policy, edit the input, lose or corrupt a staged file). Staging that no
longer fits is dropped with a warning and recomputed; a shard never gets stuck; corrupt bytes
never publish; a kill costs at most `concurrency + max_unstaged_rows` fetches."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_assets.core import stages
from laion_assets.core.images.download import ShardDownloader, max_unstaged
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import ValidationFailed
from laion_assets.core.stages import fingerprints, staging
from laion_assets_tests.conftest import make_config
from laion_assets_tests.test_download import _shard, dcfg

STAGING = stages.STAGING_IMAGES


class _Crash(Exception):
    """Stands for a kill: the run stops right after its first staged chunk."""


class CrashingLake(Lake):
    """A lake whose writes to the images staging fail after `chunks` appends."""

    def __init__(self, uri, chunks: int = 1):
        super().__init__(uri)
        self.left = chunks

    def append(self, name, data, shard=None):
        if name == STAGING:
            if self.left == 0:
                raise _Crash
            self.left -= 1
        super().append(name, data, shard)


def urls_for(base: str, tag: str, n: int = 24, bad: int = 0) -> list[str]:
    return [f"{base}/sleep/0/{tag}{i}/p{i % 3}.jpg" for i in range(n)] + [f"{base}/status/404/{tag}-gone{i}" for i in range(bad)]


def requests(site, urls: list[str], base: str) -> int:
    return sum(site.count(u.split(base, 1)[1]) for u in urls)


def crash_after_first_chunk(lake: Lake, cfg, key: str) -> int:
    with pytest.raises(_Crash):
        stages.run_images(CrashingLake(lake.uri), cfg, key)
    staged = lake.read_shard(STAGING, key).height
    assert staged == cfg.download.chunk_rows
    return staged


def crashed_shard(testsite, tmp_path: Path, tag: str, bad: int = 0):
    """A shard of 24 slow-route images (+ `bad` 404s) whose images run crashed after its first
    staged chunk of 8: (site, base, urls, cfg, lake, key)."""
    site, base = testsite
    urls = urls_for(base, tag, bad=bad)
    cfg = make_config(download=dcfg(chunk_rows=8))
    lake = Lake(tmp_path / "lake")
    key = _shard(lake, tmp_path, urls, cfg)
    crash_after_first_chunk(lake, cfg, key)
    return site, base, urls, cfg, lake, key


def published(lake: Lake, key: str) -> pl.DataFrame:
    return lake.read_shard(stages.IMAGES, key).sort("uid")


def assert_complete(lake: Lake, key: str) -> pl.DataFrame:
    """One row per raw_urls row, every stored image equal to its checksum, no staging left."""
    images = published(lake, key)
    raw = lake.read_shard(stages.RAW_URLS, key, ["uid"])
    assert images["uid"].to_list() == raw["uid"].sort().to_list()
    for img, want in images.select("image", "image_sha256").iter_rows():
        assert (img is None) == (want is None) and (img is None or hashlib.sha256(img).hexdigest() == want)
    assert lake.shard_row_count(STAGING, key) == 0
    assert not list(Path(lake.table_uri(STAGING), f"shard={key}").glob("*.parquet"))  # files removed too
    return images


@pytest.mark.slow
def test_a_config_change_drops_the_staging_a_speed_change_keeps_it(testsite, tmp_path, caplog):
    site, base, urls, cfg, lake, key = crashed_shard(testsite, tmp_path, "cfg")
    before = requests(site, urls, base)
    faster = make_config(download=dcfg(chunk_rows=8, concurrency=3, per_host=2, max_pending_mb=8, max_unstaged_rows=12))
    out = stages.run_images(lake, faster, key)  # only speed knobs changed: the staged rows resume
    assert out.stats["resumed_rows"] == 8 and out.stats["fetched_this_run"] == len(urls) - 8
    assert requests(site, urls, base) == before + len(urls) - 8

    lake.delete_shard(stages.IMAGES, key)
    crash_after_first_chunk(lake, cfg, key)
    before = requests(site, urls, base)
    bigger = make_config(download=dcfg(chunk_rows=8), images=cfg.images.model_copy(update={"size": 96}))
    caplog.clear()
    stages.run_images(lake, bigger, key)  # the image recipe changed: the staged rows are redone
    assert "dropped and recomputed: 8 of 8 rows were made from other inputs, config or code" in caplog.text
    assert requests(site, urls, base) == before + len(urls)
    images = assert_complete(lake, key)
    assert (images.select(pl.min_horizontal("width", "height")) == 96).to_series().all()


def test_a_forgotten_allowed_networks_is_fixed_by_a_plain_rerun(testsite, tmp_path, caplog):
    """Every row refused (a policy problem, not the data): the gate fails, the staging goes,
    and after the fix a plain rerun fetches everything instead of failing the same way."""
    site, base = testsite
    urls = urls_for(base, "nets", n=12)
    lake = Lake(tmp_path / "lake")
    forgot = make_config(download=dcfg(allowed_networks=(), min_success_rate=0.5))
    key = _shard(lake, tmp_path, urls, forgot)
    with pytest.raises(ValidationFailed):
        stages.run_images(lake, forgot, key)
    assert requests(site, urls, base) == 0  # refused before connecting
    assert "the shard failed its gate" in caplog.text
    assert lake.shard_row_count(STAGING, key) == 0

    fixed = make_config(download=dcfg(min_success_rate=0.5))
    out = stages.run_images(lake, fixed, key)
    assert out.stats["status_counts"] == {"success": 12} and requests(site, urls, base) == 12


def test_staging_of_another_raw_urls_is_dropped(testsite, tmp_path, caplog):
    """The input was edited after a crash: its new raw_urls gets a fresh download and the gate
    passes, instead of failing forever on rows of the old input."""
    _, base, urls, cfg, lake, key = crashed_shard(testsite, tmp_path, "edit")
    edited = urls[:5] + [f"{base}/sleep/0/edit-new{i}/p0.jpg" for i in range(7)]
    assert _shard(lake, tmp_path, edited, cfg) == key  # same file, new content, republished
    out = stages.run_images(lake, cfg, key)
    assert "were made from other inputs, config or code" in caplog.text
    assert out.rows == len(edited)
    assert set(assert_complete(lake, key)["url"]) == set(edited)


@pytest.mark.parametrize("damage", ["truncated", "missing", "bytes_changed", "random_bytes"])
def test_damaged_staging_is_recomputed_and_never_published(testsite, tmp_path, caplog, damage):
    """A truncated or deleted staged file, or image bytes that changed after they were staged:
    the staging is dropped with a warning, the shard downloaded again, and what is published
    is intact (every image equal to the checksum taken when it was encoded)."""
    _, _, urls, cfg, lake, key = crashed_shard(testsite, tmp_path, f"dmg-{damage}-", bad=2)
    [path] = [Path(u) for u in lake.shard_files(STAGING, key)]
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "missing":
        path.unlink()
    elif damage == "bytes_changed":  # still a valid parquet file, one image's bytes replaced
        table = pq.read_table(path)
        images = table["image"].to_pylist()
        k = next(i for i, img in enumerate(images) if img is not None)
        images[k] = os.urandom(len(images[k]))
        pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), path)
    else:  # random bytes written over the middle of the file
        start = len(data) // 3
        path.write_bytes(data[:start] + os.urandom(4096) + data[start + 4096:])

    out = stages.run_images(lake, cfg, key)
    why = {"truncated": "cannot be read", "missing": "cannot be read", "bytes_changed": "do not match the checksum"}
    assert "dropped and recomputed" in caplog.text and why.get(damage, "") in caplog.text
    assert out.rows == len(urls)
    images = assert_complete(lake, key)
    assert (images["status"] == "success").sum() == 24


def test_retry_failures_after_a_crash_never_doubles_a_uid(testsite, tmp_path):
    _, base = testsite
    urls = urls_for(base, "retry") + [f"{base}/flaky/1/rk{i}/p0.jpg" for i in range(3)]
    cfg = make_config(download=dcfg(chunk_rows=8))
    lake = Lake(tmp_path / "lake")
    key = _shard(lake, tmp_path, urls, cfg)
    out = stages.run_images(lake, cfg, key, retry_failures=True)  # nothing published yet: a plain run
    assert out.stats["status_counts"] == {"http_error": 3, "success": 24}
    crash_after_first_chunk(lake, cfg, key)  # a forced rerun killed: staged rows also published
    out = stages.run_images(lake, cfg, key, retry_failures=True)
    images = assert_complete(lake, key)
    assert images["uid"].n_unique() == len(urls) == out.rows
    assert out.stats["status_counts"] == {"success": 27}


def test_a_kill_costs_at_most_concurrency_plus_max_unstaged_rows(testsite, tmp_path):
    """While a chunk is being staged (slowly), fetching may not run ahead by more than
    `concurrency + max_unstaged_rows` rows: what a kill at that moment would fetch again."""
    site, base = testsite
    urls = urls_for(base, "bound", n=96)
    d = dcfg(chunk_rows=8, concurrency=4, per_host=4, max_unstaged_rows=16)
    bound = max_unstaged(d)
    assert bound == 20
    staged, ahead = 0, []

    def on_chunk(table: pa.Table) -> None:
        nonlocal staged
        time.sleep(0.3)  # a slow store: decode and fetch go on meanwhile
        ahead.append(requests(site, urls, base) - staged)
        staged += table.num_rows

    ShardDownloader(d, make_config().images, decode="thread").run(list(enumerate(urls)), len(urls), on_chunk)
    assert staged == len(urls)
    assert max(ahead) <= bound, ahead
    assert max(ahead) > d.chunk_rows  # fetching did run ahead of staging


def test_no_garbage_is_left(testsite, tmp_path):
    """Published shards keep no staging (rows or files); staging a kill left behind a publish
    is swept; superseded files and files of a publish killed before its commit are vacuumed
    (the latter only once older than an hour: a publish in progress is never touched)."""
    _, base = testsite
    cfg = make_config(download=dcfg(chunk_rows=8))
    lake = Lake(tmp_path / "lake")
    key = _shard(lake, tmp_path, urls_for(base, "gc"), cfg)
    stages.run_images(lake, cfg, key)
    assert_complete(lake, key)
    rec = fingerprints.recorded(lake, stages.IMAGES, key)
    assert rec.fingerprint == fingerprints.current(lake, cfg, stages.IMAGES, key)

    # a kill after the publish, before the staging was removed
    lake.append(STAGING, pa.table({"uid": pa.array([1], pa.int64()), "recipe": [rec.recipe]}), shard=key)
    assert staging.leftover(lake, stages.IMAGES, key)
    assert staging.sweep(lake) == [f"{STAGING}/{key}"]
    assert lake.shard_row_count(STAGING, key) == 0

    stages.run_images(lake, cfg, key)  # a forced redo: the first publish's files are superseded
    root = Path(lake.table_uri(stages.IMAGES)) / f"shard={key}"
    old, young = root / "part-killed-old.zstd.parquet", root / "part-killed-young.zstd.parquet"
    for orphan in (old, young):
        orphan.write_bytes(b"PAR1 a publish killed before its commit")
    os.utime(old, (time.time() - 2 * 3600,) * 2)
    live = {Path(u).name for u in lake.shard_files(stages.IMAGES, key)}
    lake.vacuum(stages.IMAGES, 0)
    assert {p.name for p in root.iterdir()} == live | {young.name}
    assert published(lake, key).height == 24


# -- fingerprints: what makes a published shard up to date --------------------------------------

def test_every_config_section_is_classified():
    """A new config section must say which stage's rows it decides (fingerprints.SECTIONS)."""
    from laion_assets.core.config import PipelineConfig

    assert set(PipelineConfig.model_fields) == set(fingerprints.SECTIONS)


def registered_shard(tmp_path: Path) -> tuple[Lake, Path]:
    """A lake with shard `s` registered (one row), nothing published."""
    from laion_assets.core.ingest import registry

    lake = Lake(tmp_path / "lake")
    source = tmp_path / "s.parquet"
    pl.DataFrame({"URL": ["http://127.0.0.1/a.jpg"], "TEXT": ["a"]}).write_parquet(source)
    registry.register(lake, [str(source)])
    return lake, source


def test_fingerprints_follow_inputs_config_and_code(tmp_path):
    from laion_assets.core.subsets.rules import SubsetConfig

    lake, source = registered_shard(tmp_path)
    cfg = make_config()
    stages.run_raw_urls(lake, cfg, "s")
    for table in (stages.IMAGES, "embeddings/tiny", stages.SCORES):
        lake.publish_shard(table, "s", pl.DataFrame({"uid": [1]}))
    tables = ["raw_urls", "images", "embeddings/tiny", "scores", "subsets/similar", "subsets/pretty"]

    def fps(c=cfg):
        return {t: fingerprints.current(lake, c, t, "s") for t in tables}

    base = fps()
    assert None not in base.values() and len(set(base.values())) == len(tables)

    def changed(c) -> set[str]:
        return {t for t, f in fps(c).items() if f != base[t]}

    assert changed(make_config(download=cfg.download.model_copy(update={"concurrency": 7, "chunk_rows": 3}))) == set()
    assert changed(make_config(download=cfg.download.model_copy(update={"allowed_networks": ()}))) == {"images"}
    assert changed(make_config(download=cfg.download.model_copy(update={"min_success_rate": 0.9}))) == {"images"}
    stricter = make_config(download=cfg.download.model_copy(update={"min_success_rate": 0.9}))
    assert fingerprints.current(lake, stricter, "images", "s", gate=False) == fingerprints.current(lake, cfg, "images", "s", gate=False)
    assert changed(make_config(embeddings=cfg.embeddings.model_copy(update={"batch_size": 3, "workers": 1}))) == set()
    assert changed(make_config(embeddings=cfg.embeddings.model_copy(update={"precision": "fp32"}))) == {"embeddings/tiny"}
    subsets = (cfg.subsets[0], SubsetConfig(name="pretty", min_aesthetic=5.0))
    assert changed(make_config(subsets=subsets)) == {"subsets/pretty"}
    if cfg.scores.heads:  # another head file: the scores (and what reads them) are redone
        import shutil

        copy = tmp_path / "aesthetic.pth"
        shutil.copy(cfg.scores.heads["aesthetic"].path, copy)
        heads = {**cfg.scores.heads, "aesthetic": cfg.scores.heads["aesthetic"].model_copy(update={"path": str(copy)})}
        assert changed(make_config(scores=cfg.scores.model_copy(update={"heads": heads}))) == {"scores"}

    os.utime(source, (time.time() + 5,) * 2)  # the input file changed
    assert changed(cfg) == {"raw_urls"}
    stages.run_raw_urls(lake, cfg, "s")  # republished: new files, so images' input changed
    assert changed(cfg) == {"raw_urls", "images", "subsets/similar", "subsets/pretty"}
    lake.publish_shard("embeddings/tiny", "s", pl.DataFrame({"uid": [1]}))  # new vectors: scores and subsets redo
    assert changed(cfg) == {"raw_urls", "images", "embeddings/tiny", "scores", "subsets/similar", "subsets/pretty"} - {"embeddings/tiny"}


def test_a_subset_follows_its_shards_curation_marks(tmp_path):
    """A subset reads the curation marks of its shard: marks that change stale it (a pass killed
    before it took the marked rows out of the subset is redone by the next run), a pass that
    rewrites its table without touching the shard does not, and a pass that took the rows out
    itself leaves the subset up to date, unless something else it reads changed meanwhile."""
    from laion_assets.core.curation import passes
    from laion_assets.core.lake.tables import DUPLICATES

    lake, _ = registered_shard(tmp_path)
    cfg = make_config()
    stages.run_raw_urls(lake, cfg, "s")
    for table in (stages.IMAGES, "embeddings/tiny", stages.SCORES, "subsets/similar"):
        lake.publish_shard(table, "s", pl.DataFrame({"uid": [1, 2]}))
    table = "subsets/similar"
    fp, base = fingerprints.current(lake, cfg, table, "s"), fingerprints.current(lake, cfg, table, "s", marks=False)
    fingerprints.record(lake, table, "s", fp, lake.table(table).version(), base=base)
    assert fingerprints.up_to_date(lake, table, "s", fp)

    def marks(*rows):
        data = pa.table({"shard": [r[0] for r in rows], "kind": ["url"] * len(rows), "uid": [r[1] for r in rows]})
        passes.write(lake, DUPLICATES, data, mode="overwrite", partition_by=["shard"])

    def up_to_date() -> bool:
        return fingerprints.up_to_date(lake, table, "s", fingerprints.current(lake, cfg, table, "s")) is not None

    marks(("other", 7))  # the table is rewritten, this shard has no marks still
    assert up_to_date()
    marks(("other", 7), ("s", 2))  # uid 2 marked, the subset not updated yet
    assert not up_to_date()
    lake.publish_shard(table, "s", pl.DataFrame({"uid": [1]}))  # the pass takes it out
    assert fingerprints.after_pass(lake, cfg, table, ["s"]) == 1 and up_to_date()

    marks(("s", 1), ("s", 2))
    lake.publish_shard(stages.SCORES, "s", pl.DataFrame({"uid": [1, 2]}))  # new scores meanwhile
    assert fingerprints.after_pass(lake, cfg, table, ["s"]) == 0 and not up_to_date()


def test_plan_skips_what_is_up_to_date_and_redoes_downstream_of_a_redo(tmp_path):
    lake, _ = registered_shard(tmp_path)
    cfg = make_config()
    assert fingerprints.plan(lake, cfg, ["raw_urls", "images"], "s") == {"raw_urls": None, "images": None}
    stages.run_raw_urls(lake, cfg, "s")
    plan = fingerprints.plan(lake, cfg, ["raw_urls", "images"], "s")
    assert plan["raw_urls"].version == 0 and plan["images"] is None
    assert fingerprints.plan(lake, cfg, ["raw_urls", "images"], "s", redo={"raw_urls"}) == {"raw_urls": None, "images": None}
    lake.publish_shard(stages.RAW_URLS, "s", lake.read_shard(stages.RAW_URLS, "s"))  # republished by something else
    assert fingerprints.plan(lake, cfg, ["raw_urls"], "s") == {"raw_urls": None}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_download_loop_and_reaches_the_previous_handler(sig):
    """asyncio swallows an exception raised by a signal handler inside its callbacks (Dagster
    stops steps that way), so the loop is cancelled instead, cleanly, and the handler that was
    in place then gets the signal."""
    from laion_assets.core.images.signals import run_until_signal

    class Stop(BaseException):
        pass

    def raising(signo, frame):
        raise Stop(signo)

    cleaned = []

    async def download():
        loop = asyncio.get_running_loop()

        def busy() -> None:  # where asyncio spends its time: callbacks (transport writes...)
            sum(range(200_000))
            loop.call_soon(busy)

        loop.call_soon(busy)
        end = time.monotonic() + 6
        try:
            while time.monotonic() < end:
                await asyncio.sleep(0)
        finally:
            cleaned.append(True)

    previous = {s: signal.signal(s, raising) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), sig)).start()
        started = time.monotonic()
        with pytest.raises(Stop):
            run_until_signal(download())
        assert time.monotonic() - started < 3 and cleaned == [True]
        assert signal.getsignal(sig) is raising  # restored
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@pytest.mark.slow
def test_force_redoes_what_a_plain_rerun_skips(tmp_path, monkeypatch, capsys):
    """Through the CLI: a plain rerun says `up to date` and starts no Dagster run; `--force`
    publishes again; `adopt` records a lake published before fingerprints; `maintain` runs the
    maintenance job on the same instance."""
    from dagster import DagsterInstance

    from laion_assets.cli import main
    from laion_assets_tests.conftest import write_config
    from laion_assets_tests.test_runs import write_instance

    home = write_instance(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    inputs = tmp_path / "input"
    inputs.mkdir()
    pl.DataFrame({"URL": ["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"], "TEXT": ["a", "b"]}).write_parquet(inputs / "s.parquet")
    config = str(write_config(tmp_path / "c.yaml", make_config()))
    args = ["run", str(inputs), "--lake", str(tmp_path / "lake"), "--config", config, "--select", "raw_urls"]
    with DagsterInstance.from_config(str(home)) as instance:
        assert main(args) == 0 and "materialized" in capsys.readouterr().out
        runs = len(instance.get_runs())
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "s                raw_urls   up to date" in out and "--force redoes it" in out
        assert len(instance.get_runs()) == runs
        assert main([*args, "--force"]) == 0
        assert " materialized " in capsys.readouterr().out and Lake(tmp_path / "lake").table("raw_urls").version() == 1
        # a lake from before fingerprints: adopt records what is published, the next run skips it
        lake = Lake(tmp_path / "lake")
        Path(lake.uri, "_fingerprints", "raw_urls", "s.json").unlink()
        assert main(args) == 0 and " materialized " in capsys.readouterr().out  # redone: no record
        Path(lake.uri, "_fingerprints", "raw_urls", "s.json").unlink()
        assert main(["adopt", "--lake", lake.uri, "--config", config]) == 0
        assert "raw_urls" in capsys.readouterr().out and main(args) == 0 and " up to date " in capsys.readouterr().out
        assert main(["maintain", "--lake", str(tmp_path / "lake"), "--config", config]) == 0
        assert "lake maintained" in capsys.readouterr().out
        assert instance.get_runs(limit=1)[0].job_name == "lake_maintenance"
