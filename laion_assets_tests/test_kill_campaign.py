"""The kill campaign: `laion-assets run` on a real shard (images served slowly by a server on
127.0.0.1, the tiny CLIP, the real heads) killed with SIGKILL, the way an OOM kill or a lost
node ends it, at 10 points (targeted ones in every stage, and a random time), and twice stopped
with SIGTERM; each time simply run again. No manual step, no hang: every table ends equal to an
uninterrupted reference, each rerun fetches again at most `concurrency + max_unstaged_rows` URLs
(the documented bound), killed runs are marked failed and hold no pool slot, nothing is left
in staging, and one more plain rerun finds every stage up to date (the exports and lake-wide
assets too) and fetches nothing."""

from __future__ import annotations

import glob
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance, DagsterRunStatus, instance_for_test

from laion_assets.cli.pipeline import run_pipeline
from laion_assets.core.embeddings.config import EmbeddingConfig, SpaceConfig
from laion_assets.core.exports.config import ExportConfig, KnnConfig
from laion_assets.core.images.download import max_unstaged
from laion_assets.core.lake.delta import Lake
from laion_assets.core.scores.config import WatermarkConfig
from laion_assets_tests.conftest import REPO, make_config, write_config
from laion_assets_tests.faultsite import FaultServer, SiteState
from laion_assets_tests.test_download import dcfg
from laion_assets_tests.test_runs import cli_env, write_instance

SHARD = "campaign"
TABLES = ["raw_urls", "language", "images", "embeddings/tiny", "watermark", "scores", "subsets/similar", "subsets/pretty"]
EXPORTS_AND_LAKE_WIDE = [
    "curation/dedup_keys", "webdataset/similar", "webdataset/pretty", "knn/similar", "knn/pretty",
    "curation/duplicates", "curation/blocked", "lake_summary",
]
RUN_TIMEOUT_S = 300  # a run that takes longer than this hangs


@dataclass
class Point:
    name: str
    watch: str | None  # glob under the lake: kill when a file appears that was not there at the start
    after: int = 1  # ... the n-th such new file
    sig: int = signal.SIGKILL
    at_s: float | None = None  # or kill at this time after the start


def points(rng: random.Random) -> list[Point]:
    s = f"shard={SHARD}"
    # In pipeline order, each point ahead of where the previous kill left the shard; the random
    # times fall early in their run (start-up, ingest, skipping what is done), so that on a fast
    # machine too they never pass the points that follow.
    return [
        Point("ingest: shard registered", "_shards/_delta_log/*.json"),
        Point("ingest: raw_urls publishing", f"raw_urls/{s}/*.parquet"),
        Point("random time", None, at_s=rng.uniform(1, 3)),
        Point("download: a chunk staged", f"_staging/images/{s}/*.parquet"),
        Point("download: SIGTERM", f"_staging/images/{s}/*.parquet", sig=signal.SIGTERM),
        Point("images publishing", f"images/{s}/*.parquet"),
        Point("images published", f"_fingerprints/images/{SHARD}.json"),
        Point("embeddings: a chunk staged", f"_staging/embeddings/tiny/{s}/*.parquet"),
        Point("embeddings: SIGTERM", f"_staging/embeddings/tiny/{s}/*.parquet", sig=signal.SIGTERM),
        Point("embeddings publishing", f"embeddings/tiny/{s}/*.parquet"),
        Point("scores publishing", f"scores/{s}/*.parquet"),
        Point("subsets publishing", f"subsets/*/{s}/*.parquet"),
    ]


@pytest.fixture(scope="module")
def slow_site(site):
    """The sample photos served with a delay per request, counting requests per path."""
    server = FaultServer(site[0])
    yield server.site, server.base_url
    server.close()


def run_cli(tmp_path: Path, home: Path, args: list[str], point: Point | None, lake: Path, log: str) -> tuple[int | None, float]:
    """Start the CLI; kill it at `point` (None: let it finish). Returns (exit code, seconds from
    the signal to the exit), exit code None when it was SIGKILLed."""
    before = {p for p in glob.glob(str(lake / point.watch))} if point and point.watch else set()
    out = open(tmp_path / f"{log}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "laion_assets.cli", "run", *args], env=cli_env(home), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    started = time.monotonic()
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            assert elapsed < RUN_TIMEOUT_S, f"run {log} hangs:\n" + (tmp_path / f"{log}.log").read_text()[-3000:]
            due = point is not None and (
                (point.at_s is not None and elapsed >= point.at_s)
                or (point.watch and len(set(glob.glob(str(lake / point.watch))) - before) >= point.after)
            )
            if due:
                proc.send_signal(point.sig)
                sent = time.monotonic()
                code = proc.wait(60)
                return (None if point.sig == signal.SIGKILL else code), time.monotonic() - sent
            time.sleep(0.01)
        return proc.returncode, 0.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def fetches(state: SiteState) -> Counter:
    with state.lock:
        return Counter(state.hits)


def read(lake: Path, table: str) -> pl.DataFrame:
    df = pl.read_delta(str(lake / table)).drop("shard", "duration_s", strict=False).sort("uid")
    for col in ("image_embedding", "text_embedding"):
        if col in df.columns:  # float16 cells: compared as numbers (chunks differ after a resume)
            df = df.with_columns(pl.Series(col, [np.frombuffer(c, "<f2").astype(np.float32).tolist() for c in df[col]]))
    return df


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill_anywhere_then_rerun_gives_the_uninterrupted_tables(tmp_path, slow_site, site):
    state, base = slow_site
    files = [e["file"] for e in site[1]][:56]
    urls = [f"{base}/sleep/300/k{i}/{f}" for i, f in enumerate(files)] + [f"{base}/status/404/gone{i}" for i in range(4)]
    urls += [f"{base}/status/503/busy{i}" for i in range(2)]  # retryable: fetched again by every run, by design
    inputs = tmp_path / "input"
    inputs.mkdir()
    pl.DataFrame({"URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))]}).write_parquet(inputs / f"{SHARD}.parquet")
    cfg = make_config(
        download=dcfg(concurrency=4, per_host=4, chunk_rows=8, max_unstaged_rows=16, min_success_rate=0.5),
        embeddings=EmbeddingConfig(spaces={"tiny": SpaceConfig(model="tiny")}, batch_size=8, chunk_rows=16, workers=1),
        watermark=WatermarkConfig(model="tiny"),  # one more tower of the embeddings pass, staged alike
        export=ExportConfig(samples_per_tar=16), knn=KnnConfig(),  # every subset exported and indexed
    )
    config = write_config(tmp_path / "config.yaml", cfg)
    bound = max_unstaged(cfg.download)
    retryable = {u.split(base, 1)[1] for u in urls if "/503/" in u}

    reference = tmp_path / "reference"
    with instance_for_test() as instance:
        summary = run_pipeline([str(inputs)], str(reference), str(config), None, instance=instance)
    assert summary.ok, summary.lines

    home = write_instance(tmp_path / "home")
    lake = tmp_path / "lake"
    args = [str(inputs), "--lake", str(lake), "--config", str(config)]
    by_reference = fetches(state)
    seen = Counter()  # fetches by the campaign's runs so far
    kills, stopped, refetched = [], [], []
    for k, point in enumerate(points(random.Random(10))):
        code, took = run_cli(tmp_path, home, args, point, lake, f"run{k:02d}")
        now = fetches(state) - by_reference
        again = sum(n - (0 if seen[path] else 1) for path, n in (now - seen).items() if path not in retryable)
        refetched.append((point.name, again))  # fetched by this run although an earlier run had
        seen = now
        if code == 0:  # the run finished before the point came: nothing to kill
            continue
        kills.append(point.name)
        if point.sig == signal.SIGTERM:
            assert code == 130 and took < 15, f"SIGTERM at '{point.name}': exit {code} after {took:.1f} s"
            stopped.append(point.name)
        else:
            assert code is None, f"run {k} ended with {code} before '{point.name}'"
    print(f"kills: {kills}; fetched again per rerun (bound {bound}): {refetched}")
    assert len(kills) == 12, kills
    assert len(stopped) == 2
    assert max(n for _, n in refetched) <= bound, refetched

    code, _ = run_cli(tmp_path, home, args, None, lake, "final")
    assert code == 0, (tmp_path / "final.log").read_text()[-3000:]
    for table in TABLES:
        got, want = read(lake, table), read(reference, table)
        assert got.columns == want.columns and got["uid"].to_list() == want["uid"].to_list(), table
        for col in got.columns:
            if got[col].dtype in (pl.Float32, pl.Float64) or isinstance(got[col].dtype, pl.List):
                a, b = (np.array(s.to_list(), dtype=np.float64) for s in (got[col], want[col]))
                assert np.allclose(a, b, atol=2e-3, equal_nan=True), (table, col)
            else:
                assert got[col].equals(want[col]), (table, col)

    # nothing left behind: no staged rows, no run left STARTED, no pool slot held
    check = Lake(lake)
    for staged in ("_staging/images", "_staging/embeddings/tiny"):
        assert not check.exists(staged) or check.shard_row_count(staged, SHARD) == 0
        assert not glob.glob(str(lake / staged / f"shard={SHARD}" / "*.parquet"))
    with DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert all(r.status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE) for r in runs)
        for pool in ("download", "gpu"):
            assert instance.event_log_storage.get_concurrency_info(pool).claimed_slots == []

    # a plain rerun: every stage up to date, exports and lake-wide assets too, nothing fetched
    before = fetches(state)
    code, _ = run_cli(tmp_path, home, args, None, lake, "rerun")
    out = (tmp_path / "rerun.log").read_text()
    lines = [line for line in out.splitlines() if line.startswith((f"  {SHARD} ", "  (lake) "))]
    assert code == 0 and all(" up to date " in line for line in lines), out[-3000:]
    assert {line.split()[1] for line in lines} == {*TABLES, *EXPORTS_AND_LAKE_WIDE}, out[-3000:]
    assert fetches(state) - before == Counter()
