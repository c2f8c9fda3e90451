"""Download a shard: fetch every URL concurrently, process images on worker threads, and hand
results over in chunks so a killed run loses at most one chunk in flight.

Network waits overlap on one asyncio loop; decode/resize/encode and hashing run on a thread
pool (Pillow and hashlib release the GIL). In-flight work is bounded by `concurrency`, and
results are flushed every `chunk_rows`, so memory does not grow with the shard.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from aiohttp.abc import AbstractResolver

from laion_assets.core.config import DownloadConfig, ImageConfig
from laion_assets.core.errors import LaionAssetsError
from laion_assets.core.fetch import Fetched, Fetcher
from laion_assets.core.imaging import ImageProcessor

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
    ]
)

STATUSES = (
    "success", "http_error", "failed_download", "failed_decode", "opted_out", "refused_address",
    "blocked", "too_small", "bad_aspect_ratio", "too_large",
)


def default_concurrency() -> int:
    return min(512, 64 * (os.cpu_count() or 1))


def load_blocklist(path: str | None) -> frozenset[str]:
    """One entry a line (a URL, or a lowercase sha256 hex); '#' starts a comment."""
    if not path:
        return frozenset()
    p = Path(path)
    if not p.is_file():
        raise LaionAssetsError(f"blocklist {p} not found: fix the path in the download config")
    lines = (line.split("#", 1)[0].strip() for line in p.read_text().splitlines())
    return frozenset(line for line in lines if line)


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


@dataclass
class Progress:
    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    statuses: Counter = field(default_factory=Counter)
    bytes: int = 0

    @property
    def rate(self) -> float:
        return self.done / max(1e-9, time.monotonic() - self.started)

    def line(self) -> str:
        failed = self.done - self.statuses.get("success", 0)
        return f"{self.done}/{self.total} images, {self.rate:.1f}/s, {failed} not stored so far"


class ShardDownloader:
    """Configured once per shard; `run` streams result chunks to `on_chunk`."""

    def __init__(
        self, dcfg: DownloadConfig, icfg: ImageConfig, *, resolver: AbstractResolver | None = None,
        workers: int | None = None,
    ):
        self.dcfg = dcfg.model_copy(update={"concurrency": dcfg.concurrency or default_concurrency()})
        self.process = ImageProcessor(icfg)
        self.resolver = resolver
        self.workers = workers or max(2, os.cpu_count() or 1)
        self.blocked_urls = load_blocklist(dcfg.url_blocklist)
        self.blocked_images = load_blocklist(dcfg.image_blocklist)

    def run(
        self,
        rows: Iterable[tuple[int, str]],
        total: int,
        on_chunk: Callable[[pa.Table], None],
        on_progress: Callable[[Progress], None] | None = None,
        progress_every_s: float = 10.0,
    ) -> Progress:
        return asyncio.run(self._run(rows, total, on_chunk, on_progress, progress_every_s))

    async def _run(self, rows, total, on_chunk, on_progress, every) -> Progress:
        progress = Progress(total)
        pending: list[dict] = []
        sem = asyncio.Semaphore(self.dcfg.concurrency)
        cpu = ThreadPoolExecutor(self.workers, thread_name_prefix="image")
        writer = ThreadPoolExecutor(1, thread_name_prefix="stage-writer")
        flush_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()

        async def flush(force: bool = False) -> None:
            async with flush_lock:
                if pending and (force or len(pending) >= self.dcfg.chunk_rows):
                    batch = pending[:]
                    pending.clear()
                    table = pa.Table.from_pylist(batch, schema=IMAGES_SCHEMA)
                    await loop.run_in_executor(writer, on_chunk, table)

        async def one(uid: int, url: str, fetcher: Fetcher) -> None:
            start = time.monotonic()
            try:
                row = await self._sample(uid, url, fetcher, cpu, loop)
            except Exception as e:  # never lose a row, whatever broke
                row = {"uid": uid, "url": url, "status": "failed_download", "error": f"internal: {e!r}"}
            finally:
                sem.release()
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

        reporter = asyncio.create_task(report())
        tasks: set[asyncio.Task] = set()
        try:
            async with Fetcher(self.dcfg, resolver=self.resolver) as fetcher:
                for uid, url in rows:
                    await sem.acquire()
                    task = asyncio.create_task(one(uid, url, fetcher))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*tasks)
            await flush(force=True)
        finally:
            reporter.cancel()
            cpu.shutdown(wait=False, cancel_futures=True)
            writer.shutdown(wait=True)
        if on_progress:
            on_progress(progress)
        return progress

    async def _sample(self, uid, url, fetcher: Fetcher, cpu, loop) -> dict:
        row: dict = {"uid": uid, "url": url}
        if self.blocked_urls and (url in self.blocked_urls or url_hash(url) in self.blocked_urls):
            row.update(status="blocked", error="URL on the blocklist", attempts=0)
            return row
        got: Fetched = await fetcher.fetch(url)
        row.update(
            status=got.status, error=got.error, retryable=got.retryable, http_status=got.http_status,
            content_type=got.content_type, attempts=got.attempts,
            bytes_downloaded=len(got.body) if got.body is not None else None,
        )
        if got.status != "success":
            return row
        row.update(await loop.run_in_executor(cpu, self._image, got.body))
        return row

    def _image(self, body: bytes) -> dict:
        sha = hashlib.sha256(body).hexdigest()
        if sha in self.blocked_images:
            return {"status": "blocked", "error": "image hash on the blocklist", "sha256": sha}
        res = self.process(body)
        return {
            "status": res.status, "error": res.error, "sha256": sha,
            "original_width": res.original_width, "original_height": res.original_height,
            "width": res.width, "height": res.height, "image": res.image,
        }



