"""The images stage end to end against real servers on 127.0.0.1: per-sample statuses, filters,
blocklists, decode safety, bounded memory, worker crashes, per-image resume after kill -9, and
retry-only-failures."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from laion_assets.core import stages
from laion_assets.core.images.config import DownloadConfig, ImageConfig
from laion_assets.core.images.download import I2D_STATUS, STATUSES, ShardDownloader
from laion_assets.core.images.workers import DEPTH, CpuPool, WorkerGone
from laion_assets.core.ingest import registry
from laion_assets.core.ingest.reader import shard_key
from laion_assets.core.lake.delta import Lake
from laion_assets_tests.conftest import make_config

LOCAL = ("127.0.0.1/32",)


def dcfg(**kw) -> DownloadConfig:
    base = dict(allowed_networks=LOCAL, retries=0, chunk_rows=8, read_timeout_s=5, total_timeout_s=10, min_success_rate=0)
    base.update(kw)
    return DownloadConfig(**base)


def download(urls, d: DownloadConfig | None = None, i: ImageConfig | None = None, decode="thread", **kw):
    chunks = []
    progress = ShardDownloader(d or dcfg(), i or ImageConfig(size=64), decode=decode, **kw).run(
        list(enumerate(urls)), len(urls), chunks.append
    )
    rows = pl.concat([pl.from_arrow(c) for c in chunks]) if chunks else None
    return rows, progress, chunks


def by_url(rows: pl.DataFrame) -> dict[str, dict]:
    return {r["url"]: r for r in rows.iter_rows(named=True)}


# -- one shard through the downloader --------------------------------------------------------

@pytest.mark.parametrize("decode", ["process", "thread"])
def test_every_fault_gets_its_status(server, shard_rows, site, decode):
    urls = shard_rows["URL"].to_list()
    rows, progress, chunks = download(urls, decode=decode)
    assert rows.height == len(urls) and rows["uid"].n_unique() == len(urls)  # one row per input row
    assert all(c.num_rows <= 8 for c in chunks)
    assert set(rows["status"]) <= set(STATUSES)
    got = by_url(rows.filter(pl.col("url").is_not_null()))
    for url, r in got.items():
        kind = url.split("/")[3] if url.startswith("http") else "bad"
        expected = {
            "img": "success", "redirect": "success", "missing": "http_error", "error": "http_error",
            "html": "failed_decode", "truncated": "failed_decode", "noai": "opted_out", "bad": "refused_scheme",
        }[kind]
        assert r["status"] == expected, (url, r["status"], r["error"])
        assert (r["image"] is not None) == (r["status"] == "success")
        if kind == "error":
            assert r["retryable"] and r["http_status"] == 500
        if kind == "missing":
            assert not r["retryable"] and r["http_status"] == 404
        if kind == "html":
            assert "HTML" in r["error"]
    # sha256 is of the original bytes; stored images are re-encoded at the target size
    one = next(u for u in got if "/img/" in u and u.endswith(".jpg"))
    original = (site[0] / one.rsplit("/", 1)[1]).read_bytes()
    assert got[one]["sha256"] == hashlib.sha256(original).hexdigest()
    img = Image.open(io.BytesIO(got[one]["image"]))
    assert img.format == "JPEG" and min(img.size) == 64
    assert progress.done == len(urls) and sum(progress.statuses.values()) == len(urls)
    assert progress.statuses["success"] == rows.filter(pl.col("status") == "success").height


def test_status_mapping_to_img2dataset_is_complete():
    assert set(I2D_STATUS) == set(STATUSES)


def test_img2dataset_outcomes_map_to_lake_statuses_and_back():
    from laion_assets.core.images.adopt import lake_status

    cases = {
        ("success", None): ("success", None),
        ("failed_to_download", "HTTP Error 404: Not Found"): ("http_error", 404),
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>"): ("failed_download", None),
        ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive"): ("opted_out", None),
        ("failed_to_download", "hash mismatch"): ("failed_download", None),
        ("failed_to_resize", "image too small"): ("too_small", None),
        ("failed_to_resize", "aspect ratio too large"): ("bad_aspect_ratio", None),
        ("failed_to_resize", "image area too large"): ("too_large", None),
        ("failed_to_resize", "Image decoding error"): ("failed_decode", None),
    }
    for (i2d, error), want in cases.items():
        assert lake_status(i2d, error) == want
        assert I2D_STATUS[want[0]] == i2d  # and back: exports and comparisons see img2dataset's outcome


def _save(root: Path, name: str, img: Image.Image, **kw) -> str:
    img.save(root / name, **kw)
    return name


def test_filters_decode_guard_exif_and_reencode(testsite):
    site, base = testsite
    root = site.root
    files = {
        "tiny": _save(root, "tiny.jpg", Image.new("RGB", (20, 30))),
        "wide": _save(root, "wide.jpg", Image.new("RGB", (900, 100))),
        "huge": _save(root, "huge.png", Image.new("L", (3000, 3000))),
        "bomb": _save(root, "bomb.png", Image.new("1", (12000, 12000))),  # 144 Mpx in ~20 KB
        "fits": _save(root, "fits.jpg", Image.new("RGB", (64, 80), (10, 200, 30)), quality=80),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    files["exif"] = _save(root, "exif.jpg", Image.new("RGB", (200, 100)), exif=exif)
    urls = [f"{base}/img/{f}" for f in files.values()]
    icfg = ImageConfig(size=64, min_image_size=32, max_aspect_ratio=4, max_image_area=4_000_000,
                       max_decode_pixels=50_000_000, skip_reencode=True)
    rows, _, _ = download(urls, i=icfg, decode="process")
    got = {Path(r["url"]).stem: r for r in rows.iter_rows(named=True)}
    assert got["tiny"]["status"] == "too_small"
    assert got["wide"]["status"] == "bad_aspect_ratio"
    assert got["huge"]["status"] == "too_large"
    assert got["bomb"]["status"] == "failed_decode" and "decompression bomb" in got["bomb"]["error"]
    for k in ("tiny", "wide", "huge", "bomb"):
        assert got[k]["image"] is None and got[k]["sha256"]
    # EXIF orientation applied: stored upright (portrait), smallest side 64
    assert got["exif"]["status"] == "success"
    assert (got["exif"]["original_width"], got["exif"]["original_height"]) == (200, 100)
    assert (got["exif"]["width"], got["exif"]["height"]) == (64, 128)
    assert Image.open(io.BytesIO(got["exif"]["image"])).size == (64, 128)
    # already the target size and format: the original bytes are stored as they are
    assert got["fits"]["image"] == (root / files["fits"]).read_bytes()


def test_blocklists(testsite, tmp_path):
    site, base = testsite
    blocked_url = f"{base}/status/200/blocked-url"
    hashed_url = f"{base}/status/200/blocked-by-hash"
    p0 = (site.root / "p0.jpg").read_bytes()
    (tmp_path / "urls.txt").write_text(f"# URLs\n{blocked_url}\n{hashlib.sha256(hashed_url.encode()).hexdigest()}\n")
    (tmp_path / "images.txt").write_text(hashlib.sha256(p0).hexdigest().upper() + "  # p0\n")
    d = dcfg(url_blocklist=str(tmp_path / "urls.txt"), image_blocklist=str(tmp_path / "images.txt"))
    rows, _, _ = download([blocked_url, hashed_url, f"{base}/img/p0.jpg", f"{base}/img/p1.jpg"], d)
    got = by_url(rows)
    assert got[blocked_url]["status"] == got[hashed_url]["status"] == "blocked"
    assert site.count("/status/200/blocked-url") == site.count("/status/200/blocked-by-hash") == 0  # never fetched
    assert got[f"{base}/img/p0.jpg"]["status"] == "blocked" and got[f"{base}/img/p0.jpg"]["image"] is None
    assert got[f"{base}/img/p1.jpg"]["status"] == "success"


def test_memory_is_bounded_by_configuration(testsite):
    """Rows are pulled from the input only as slots free up, never more than `concurrency` are
    in flight on the network, bodies waiting for decode stay within `max_pending_mb`, and
    finished rows are flushed every `chunk_rows`."""
    site, base = testsite
    pulled = []
    flushed_at = []

    def rows():
        for i in range(60):
            pulled.append(i)
            yield i, f"{base}/sleep/20/bounded{i}/p0.jpg"

    with site.lock:
        site.max_sleeping = 0
    ShardDownloader(dcfg(concurrency=5, per_host=50, chunk_rows=10, max_pending_mb=1), ImageConfig(size=32), decode="thread").run(
        rows(), 60, lambda t: flushed_at.append((t.num_rows, len(pulled)))
    )
    assert site.max_sleeping <= 5
    assert all(n <= 10 for n, _ in flushed_at) and sum(n for n, _ in flushed_at) == 60
    # when the first chunk was flushed, at most chunk_rows + concurrency rows had been pulled,
    # plus the bodies that fit the decode budget
    waiting = 2**20 // (site.root / "p0.jpg").stat().st_size
    assert flushed_at[0][1] <= 10 + 5 + waiting


def test_progress_is_reported_while_running(testsite):
    site, base = testsite
    lines = []
    ShardDownloader(dcfg(concurrency=2), ImageConfig(size=32), decode="thread").run(
        [(i, f"{base}/sleep/100/progress{i}/p0.jpg") for i in range(8)], 8, lambda t: None,
        lambda p: lines.append(p.line()), progress_every_s=0.1,
    )
    assert len(lines) >= 3 and lines[-1].startswith("8/8 images")


def test_a_crashed_decoder_costs_a_worker_not_the_run(testsite):
    site, base = testsite
    body = (site.root / "p0.jpg").read_bytes()

    async def go():
        pool = CpuPool(ImageConfig(size=32), 2, "process")
        await pool.start()
        try:
            for w in list(pool.all):
                w.proc.kill()  # as a segfaulting decoder would
                await w.proc.wait()
            res = await pool.run(body)
            assert res.status == "success" and res.height == 32
            results = await asyncio.gather(*(pool.run(body) for _ in range(6)))
            assert all(r.status == "success" for r in results)
        finally:
            await pool.shutdown()
        return pool

    pool = asyncio.run(go())
    assert not pool.all


def test_a_decoder_that_dies_with_samples_queued_fails_none_of_them(testsite):
    """A worker holds DEPTH requests at once. When it dies, the sample it was on counts an
    attempt and the one queued behind it does not; both are decoded by the one successor."""
    site, base = testsite
    body = (site.root / "p0.jpg").read_bytes()

    async def one_worker(check):
        pool = CpuPool(ImageConfig(size=32), 1, "process")
        await pool.start()
        try:
            (w,) = pool.all
            os.kill(w.proc.pid, signal.SIGSTOP)  # holds the requests unanswered
            await check(pool, w)
        finally:
            await pool.shutdown()

    async def the_worker(pool, w):
        first, second = asyncio.create_task(w.call(body, None)), asyncio.create_task(w.call(body, None))
        while len(w.owed) < 2:
            await asyncio.sleep(0.01)
        w.proc.kill()
        with pytest.raises(asyncio.IncompleteReadError):
            await first
        with pytest.raises(WorkerGone):
            await second

    async def the_pool(pool, w):
        runs = [asyncio.create_task(pool.run(body)) for _ in range(DEPTH)]
        while len(w.owed) < DEPTH:
            await asyncio.sleep(0.01)
        w.proc.kill()
        results = await asyncio.gather(*runs)
        assert [r.status for r in results] == ["success"] * DEPTH
        assert len(pool.all) == 1 and len(pool.retired) == 1  # one successor, for both samples

    asyncio.run(one_worker(the_worker))
    asyncio.run(one_worker(the_pool))


def test_a_chunk_that_cannot_be_staged_stops_the_shard_at_once(testsite):
    """A full disk while staging (here /dev/full) raises from the download within seconds with
    its decode workers stopped; before, the loop waited for the failed chunk's slots for ever."""
    site, base = testsite
    calls = []

    def stage(table):
        calls.append(table.num_rows)
        with open("/dev/full", "wb") as full:
            full.write(b"x" * table.num_rows)
            full.flush()

    before = set(_children(os.getpid()))
    started = time.monotonic()
    with pytest.raises(OSError) as e:
        ShardDownloader(dcfg(concurrency=4, chunk_rows=4), ImageConfig(size=32), workers=2, decode="process").run(
            [(i, f"{base}/img/p{i % 3}.jpg?{i}") for i in range(200)], 200, stage,
        )
    assert e.value.errno == errno.ENOSPC and time.monotonic() - started < 30
    assert len(calls) == 1  # nothing after the failed chunk
    assert not [pid for pid in set(_children(os.getpid())) - before if _alive(pid)]


# -- the stage: resume and retry ----------------------------------------------------------------

def _shard(lake: Lake, tmp_path: Path, urls: list[str], cfg, name="part-00000") -> str:
    path = tmp_path / f"{name}.parquet"
    pl.DataFrame({"URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))]}).write_parquet(path)
    registry.register(lake, [str(path)])
    key = shard_key(str(path))
    stages.run_raw_urls(lake, cfg, key)
    return key


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


RUN_IMAGES = """
import os, sys
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
from laion_assets.core import stages
from laion_assets.core.config import PipelineConfig
from laion_assets.core.lake.delta import Lake
stages.run_images(Lake(sys.argv[1]), PipelineConfig.model_validate_json(open(sys.argv[2]).read()), sys.argv[3])
"""


def test_kill_9_mid_shard_resumes_without_downloading_again(testsite, tmp_path):
    """A subprocess downloads a shard of slow URLs; it is killed with SIGKILL once some chunks
    are staged. The restart fetches none of the staged URLs again and publishes exactly one
    row per input row; the killed run's decode workers exit on their own."""
    site, base = testsite
    n = 160
    urls = [f"{base}/sleep/60/resume{i}/p{i % 3}.jpg" for i in range(n)]
    cfg = make_config(download=dcfg(concurrency=4, per_host=4, chunk_rows=8))
    lake = Lake(tmp_path / "lake")
    key = _shard(lake, tmp_path, urls, cfg)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "LAION_ASSETS_DECODE": "process"}
    proc = subprocess.Popen([sys.executable, "-c", RUN_IMAGES, str(lake.uri), str(tmp_path / "cfg.json"), key], env=env)
    staged = 0
    workers: set[int] = set()
    deadline = time.monotonic() + 60
    try:
        while staged < 24:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            workers |= set(_children(proc.pid))
            if lake.exists(stages.STAGING_IMAGES):
                staged = lake.read_shard(stages.STAGING_IMAGES, key, ["uid"]).height
            time.sleep(0.05)
        workers |= set(_children(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = lake.read_shard(stages.STAGING_IMAGES, key, ["uid", "url", "status"])
    assert 0 < before.height < n, "killed mid-way"
    assert workers, "the run had decode workers"
    end = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "decode workers outlived the killed run"

    out = stages.run_images(lake, cfg, key)  # the restart
    for url in before["url"]:
        assert site.count(url.split(base, 1)[1]) == 1, f"{url} fetched again after resume"
    images = lake.read_shard(stages.IMAGES, key)
    assert images.height == n == out.rows and images["uid"].n_unique() == n
    assert images["uid"].sort().to_list() == lake.read_shard(stages.RAW_URLS, key, ["uid"])["uid"].sort().to_list()
    assert set(images["status"]) == {"success"}
    assert out.stats["resumed_rows"] == before.filter(pl.col("status") == "success").height
    total = sum(site.count(u.split(base, 1)[1]) for u in urls)
    assert total <= n + 4 + 8  # at most what was in flight or unflushed at the kill is fetched twice
    assert not lake.exists(stages.STAGING_IMAGES) or lake.read_shard(stages.STAGING_IMAGES, key).height == 0


def test_retry_only_failures(testsite, tmp_path):
    """Retryable failures (503) are fetched again; every other published row stays as it was
    and is not requested again."""
    site, base = testsite
    urls = (
        [f"{base}/img/p{i}.jpg?retry{i}" for i in range(3)]
        + [f"{base}/flaky/1/rf{i}/p0.jpg" for i in range(3)]
        + [f"{base}/status/404/rf-missing{i}" for i in range(2)]
    )
    cfg = make_config(download=dcfg())
    lake = Lake(tmp_path / "lake")
    key = _shard(lake, tmp_path, urls, cfg)
    first = stages.run_images(lake, cfg, key)
    assert first.stats["status_counts"] == {"success": 3, "http_error": 5}
    published = lake.read_shard(stages.IMAGES, key).sort("uid")
    hits = {u: site.count(u.split(base, 1)[1].split("?")[0]) for u in urls}

    second = stages.run_images(lake, cfg, key, retry_failures=True)
    after = lake.read_shard(stages.IMAGES, key).sort("uid")
    assert after.height == len(urls) and second.stats["fetched_this_run"] == 3
    assert second.stats["status_counts"] == {"success": 6, "http_error": 2}
    for url in urls:
        path = url.split(base, 1)[1].split("?")[0]
        assert site.count(path) == hits[url] + (1 if "/flaky/" in url else 0), url
    untouched = ~pl.col("url").str.contains("/flaky/")
    assert after.filter(untouched).drop("duration_s").equals(published.filter(untouched).drop("duration_s"))


def test_decode_budget_holds_bodies_back_until_bytes_are_released():
    import asyncio

    from laion_assets.core.images.download import ByteBudget

    async def go():
        budget = ByteBudget(100)
        await budget.acquire(60)
        waiter = asyncio.create_task(budget.acquire(60))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # 120 > 100: waits
        budget.release(60)
        await asyncio.wait_for(waiter, 1)
        assert budget.held == 60
        budget.release(60)
        await asyncio.wait_for(budget.acquire(500), 1)  # larger than the budget, alone: passes

        # first come, first served: a small body does not overtake a large one for ever, and a
        # waiter that gives up (its task cancelled) holds no one back
        large = asyncio.create_task(budget.acquire(80))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(budget.acquire(10))
        await asyncio.sleep(0.01)
        assert not large.done() and not small.done()
        large.cancel()
        budget.release(500)
        await asyncio.wait_for(small, 1)
        assert budget.held == 10

    asyncio.run(go())
