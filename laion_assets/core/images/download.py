"""Download a shard: fetch every URL concurrently, process images on worker processes, and hand
results over in chunks so a killed run loses at most the rows not yet flushed.

Network waits overlap on one asyncio loop (aiohttp: connection reuse, DNS cache, per-host
limits). Decode/resize/encode and sha256 run in worker processes started with exec (never a
bare fork: deltalake must not be forked; no multiprocessing, whose spawn re-imports the
caller's __main__), one per core by default, so the two halves use every core without
fighting over the GIL; a decoder that crashes or hangs costs one worker, not the run.
`decode="thread"` keeps everything in one process (small shards, tests, 1-core machines).

Memory is bounded by configuration, not by the shard: at most `concurrency` samples are in
flight (each body <= `max_body_bytes`, usually ~100 KB), at most `max_pending_mb` of bodies wait
for a decoder and `max_unstaged_rows` finished rows for staging (in completion order), and rows
are pulled from the input iterator only as slots free up.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
from aiohttp.abc import AbstractResolver

from laion_assets.core.images.config import DownloadConfig, ImageConfig
from laion_assets.core.images.fetch import Fetched, Fetcher
from laion_assets.core.images.imaging import ImageProcessor
from laion_assets.core.images.signals import run_until_signal
from laion_assets.core.images.timeline import TIMELINE_ENV, sample_timeline
from laion_assets.core.images.workers import CpuPool
from laion_assets.core.lake.errors import LaionAssetsError

IMAGES_SCHEMA = pa.schema(
    [
        ("uid", pa.int64()),
        ("url", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("retryable", pa.bool_()),
        ("http_status", pa.int32()),
        ("content_type", pa.string()),
        ("attempts", pa.int32()),
        ("bytes_downloaded", pa.int64()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("image", pa.binary()),
        ("duration_s", pa.float32()),
        # Added later (null in shards published before: re-materialize images to fill them):
        ("md5", pa.string()),  # of the original bytes, like sha256 (Re-LAION-style blocklists)
        ("sha1", pa.string()),
        ("phash", pa.string()),  # 64-bit pHash of the decoded image (imagehash), 16 hex digits
        ("image_sha256", pa.string()),  # of the stored bytes, taken when they were encoded
    ]
)

# Every status an images row can have: the single source of truth (gate, docs/TABLES.md, UI).
STATUSES = (
    "success", "http_error", "failed_download", "failed_decode", "opted_out", "refused_address",
    "refused_scheme", "blocked", "too_small", "bad_aspect_ratio", "too_large",
)
# What to change when a status dominates a shard (named by the images gate when it fails).
STATUS_FIXES = {
    "refused_address": "the hosts resolve to private or local addresses: add their networks to download.allowed_networks if you trust them",
    "refused_scheme": "redirects lead to non-http(s) URLs: nothing to fetch there",
    "failed_download": "connections fail or time out: check the network, raise download.total_timeout_s or download.retries, then --retry-failures",
    "http_error": "the servers answer with errors: see top_errors; 429 and 5xx are retried by --retry-failures",
    "failed_decode": "the bodies are not images: check the URL column points at images",
    "opted_out": "the sites opt out of AI use: respected by design",
    "blocked": "on download.url_blocklist or download.image_blocklist",
    "too_small": "below images.min_image_size: lower it",
    "bad_aspect_ratio": "beyond images.max_aspect_ratio: raise it",
    "too_large": "over download.max_body_bytes or images.max_image_area: raise them",
}
# img2dataset's three outcomes, for comparisons and exports. too_large covers both bodies over
# max_body_bytes and images over max_image_area: img2dataset has no body cap and would have
# downloaded such a body, then failed (or not) to resize it.
I2D_STATUS = {
    "success": "success",
    "http_error": "failed_to_download", "failed_download": "failed_to_download",
    "opted_out": "failed_to_download", "refused_address": "failed_to_download",
    "refused_scheme": "failed_to_download", "blocked": "failed_to_download",
    "failed_decode": "failed_to_resize", "too_small": "failed_to_resize",
    "bad_aspect_ratio": "failed_to_resize", "too_large": "failed_to_resize",
}


def default_concurrency() -> int:
    return min(512, 64 * (os.cpu_count() or 1))


def max_unstaged(dcfg: DownloadConfig) -> int:
    """Rows requested but not yet staged, at most: what a kill can cost a rerun (docs/RESUME.md).
    Requests in flight (at most `concurrency`) plus finished rows waiting to be staged."""
    return (dcfg.concurrency or default_concurrency()) + dcfg.max_unstaged_rows


def load_blocklist(path: str | None) -> frozenset[str]:
    """One entry a line (a URL, or a lowercase sha256 hex); '#' starts a comment."""
    if not path:
        return frozenset()
    p = Path(path)
    if not p.is_file():
        raise LaionAssetsError(f"blocklist {p} not found: fix the path in the download config")
    lines = (line.split("#", 1)[0].strip() for line in p.read_text().splitlines())
    return frozenset(line.lower() if len(line) == 64 else line for line in lines if line)


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


@dataclass
class Progress:
    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    statuses: Counter = field(default_factory=Counter)
    bytes: int = 0
    # Where the rows are now and where the seconds went (benchmarks/bench_download.py's timeline).
    in_flight: int = 0  # requests on the network
    at_cpu: int = 0  # bodies waiting for a decode worker or being decoded
    staged: int = 0
    seconds: Counter = field(default_factory=Counter)  # decode (worker CPU), digests, staging (wall)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.done / max(1e-9, self.elapsed)

    def line(self) -> str:
        failed = self.done - self.statuses.get("success", 0)
        top = ", ".join(f"{k} {v}" for k, v in self.statuses.most_common() if k != "success")
        return (
            f"{self.done}/{self.total} images, {self.rate:.1f}/s, {self.bytes / 2**20:.0f} MiB, "
            f"{failed} not stored so far" + (f" ({top})" if top else "")
        )


class ShardDownloader:
    """Configured once per shard; `run` streams result chunks to `on_chunk`.

    rows: (uid, url) or, with images.bbox_col, (uid, url, boxes to blur).

    workers: CPU workers for decode/resize/encode (default: one per core).
    decode: "process" (default on machines with 2+ cores) or "thread".
    """

    def __init__(
        self, dcfg: DownloadConfig, icfg: ImageConfig, *, resolver: AbstractResolver | None = None,
        workers: int | None = None, decode: Literal["process", "thread"] | None = None,
    ):
        self.dcfg = dcfg.model_copy(update={"concurrency": dcfg.concurrency or default_concurrency()})
        self.icfg = icfg
        self.process = ImageProcessor(icfg)
        self.resolver = resolver
        cores = os.cpu_count() or 1
        self.workers = workers or cores
        self.decode = decode or os.environ.get("LAION_ASSETS_DECODE") or ("process" if cores > 1 else "thread")
        if self.decode not in ("process", "thread"):
            raise LaionAssetsError(f"decode must be 'process' or 'thread', got '{self.decode}'")
        self.blocked_urls = load_blocklist(dcfg.url_blocklist)
        self.blocked_images = load_blocklist(dcfg.image_blocklist)

    def run(
        self,
        rows: Iterable[tuple],
        total: int,
        on_chunk: Callable[[pa.Table], None],
        on_progress: Callable[[Progress], None] | None = None,
        progress_every_s: float = 10.0,
    ) -> Progress:
        return run_until_signal(self._run(rows, total, on_chunk, on_progress, progress_every_s))

    async def _run(self, rows, total, on_chunk, on_progress, every) -> Progress:
        progress = Progress(total)
        pending: list[dict] = []
        sem = asyncio.Semaphore(self.dcfg.concurrency)
        # A finished row holds one of these until its chunk is staged, so a kill loses (and a
        # rerun fetches again) at most concurrency + max_unstaged_rows rows. A slow request
        # holds only its request slot: the front goes on past it.
        unstaged = asyncio.Semaphore(self.dcfg.max_unstaged_rows)
        budget = ByteBudget(self.dcfg.max_pending_mb * 2**20)
        cpu = CpuPool(self.icfg, self.workers, self.decode)
        writer = ThreadPoolExecutor(1, thread_name_prefix="stage-writer")
        flush_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()

        async def flush(force: bool = False) -> None:
            n = min(self.dcfg.chunk_rows, self.dcfg.max_unstaged_rows)
            if not force and len(pending) < n:  # most rows: no lock to wait for
                return
            async with flush_lock:  # rows finishing meanwhile wait in `pending` (within max_unstaged_rows)
                while pending and (force or len(pending) >= n):
                    batch = pending[:n]
                    del pending[:n]
                    table = pa.Table.from_pylist(batch, schema=IMAGES_SCHEMA)
                    t = time.monotonic()
                    await loop.run_in_executor(writer, on_chunk, table)
                    progress.seconds["staging"] += time.monotonic() - t
                    progress.staged += len(batch)
                    for _ in batch:
                        unstaged.release()

        async def one(uid: int, url: str, boxes, fetcher: Fetcher) -> None:
            start = time.monotonic()
            holds_slot, held_bytes, counted = True, 0, False
            try:
                progress.in_flight += 1
                try:
                    row, body = await self._fetch(uid, url, fetcher)
                finally:
                    progress.in_flight -= 1
                await unstaged.acquire()  # still holding the request slot: the bound holds meanwhile
                counted = True
                if body is not None:
                    # Keep fetching while images wait for a CPU worker, up to the byte budget:
                    # the network (and slow hosts) stay busy instead of queueing behind decode.
                    held_bytes = await budget.acquire(len(body))
                sem.release()
                holds_slot = False
                if body is not None:
                    row = await self._process(row, body, cpu, boxes, progress)
                    del body
            except Exception as e:  # never lose a row, whatever broke
                row = {"uid": uid, "url": url, "status": "failed_download", "error": f"internal: {e!r}"[:300]}
            finally:
                if holds_slot:
                    sem.release()
                budget.release(held_bytes)
            if not counted:
                await unstaged.acquire()
            row["duration_s"] = time.monotonic() - start
            pending.append(row)
            progress.done += 1
            progress.statuses[row["status"]] += 1
            progress.bytes += row.get("bytes_downloaded") or 0
            await flush()

        async def report() -> None:
            while True:
                await asyncio.sleep(every)
                if on_progress:
                    on_progress(progress)

        tasks: set[asyncio.Task] = set()
        failure: list[BaseException] = []
        main = asyncio.current_task()

        def settled(task: asyncio.Task) -> None:
            """A task that raised (a chunk that could not be staged: disk full, read-only lake...)
            stops the shard at once: the loop would otherwise wait for its slots for ever."""
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None and not failure:
                failure.append(task.exception())
                main.cancel()

        reporter = asyncio.create_task(report())
        reporter.add_done_callback(settled)
        if timeline := os.environ.get(TIMELINE_ENV):
            sampler = asyncio.create_task(sample_timeline(progress, cpu, timeline))
            sampler.add_done_callback(settled)
            reporter.add_done_callback(lambda _: sampler.cancel())
        try:
            await cpu.start()
            async with Fetcher(self.dcfg, resolver=self.resolver, seconds=progress.seconds) as fetcher:
                for uid, url, *boxes in rows:
                    await sem.acquire()
                    task = asyncio.create_task(one(uid, url, boxes[0] if boxes else None, fetcher))
                    tasks.add(task)
                    task.add_done_callback(settled)
                await asyncio.gather(*tasks)
            await flush(force=True)
        except asyncio.CancelledError:
            if failure:
                raise failure[0] from None
            raise
        finally:
            reporter.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # their workers retired before the shutdown
            writer.shutdown(wait=True)
            await cpu.shutdown()
        if on_progress:
            on_progress(progress)
        return progress

    async def _fetch(self, uid, url, fetcher: Fetcher) -> tuple[dict, bytes | None]:
        """The network half: a row, and the body when there is an image to process."""
        row: dict = {"uid": uid, "url": url}
        if self.blocked_urls and (url in self.blocked_urls or url_hash(url) in self.blocked_urls):
            row.update(status="blocked", error="URL on the blocklist", attempts=0)
            return row, None
        got: Fetched = await fetcher.fetch(url)
        row.update(
            status=got.status, error=got.error, retryable=got.retryable, http_status=got.http_status,
            content_type=got.content_type, attempts=got.attempts,
            bytes_downloaded=len(got.body) if got.body is not None else None,
        )
        if got.status != "success":
            return row, None
        row["digests"] = got.digests
        return row, got.body

    async def _process(self, row: dict, body: bytes, cpu: CpuPool, boxes, progress: Progress) -> dict:
        """The CPU half: blocklist (on the fetcher's digests), decode/check/resize/encode."""
        md5, sha1, sha = row.pop("digests")
        row.update(md5=md5, sha1=sha1)
        if sha in self.blocked_images:  # never decoded nor stored
            row.update(status="blocked", error="image hash on the blocklist", sha256=sha)
            return row
        progress.at_cpu += 1
        try:
            res = await cpu.run(body, boxes)
        finally:
            progress.at_cpu -= 1
        progress.seconds["decode"] += res.cpu_s
        row.update(
            status=res.status, error=res.error, sha256=sha,
            original_width=res.original_width, original_height=res.original_height,
            width=res.width, height=res.height, image=res.image,
            image_sha256=hashlib.sha256(res.image).hexdigest() if res.image is not None else None,
        )
        row["phash"] = res.phash
        return row


class ByteBudget:
    """Bytes of downloaded bodies allowed to wait for a CPU worker, granted first come, first
    served: a release wakes only the waiters that now fit (waking them all made ~300,000
    wake-ups a shard once the budget was full). A body larger than the whole budget still
    passes when nothing else is held, so nothing waits forever."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self.waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, n: int) -> int:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((n, fut))
        self._grant()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted as it was cancelled: give it back
                self.release(n)
            raise
        return n

    def release(self, n: int) -> None:
        if n:
            self.held -= n
            self._grant()

    def _grant(self) -> None:
        while self.waiters:
            n, fut = self.waiters[0]
            if not fut.cancelled() and self.held and self.held + n > self.limit:
                return
            self.waiters.popleft()
            if not fut.cancelled():
                self.held += n
                fut.set_result(None)
