"""The CPU half of the images stage: decode/resize/encode of each body, on
worker processes started with exec (never a bare fork: deltalake must not be forked; no
multiprocessing, whose spawn re-imports the caller's __main__), or on threads. A decoder that
crashes or hangs costs one worker, not the run.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import struct
import sys
from concurrent.futures import ThreadPoolExecutor

from laion_assets.core.images.config import ImageConfig
from laion_assets.core.images.imaging import (
    WORKER_CMD,
    ImageProcessor,
    ImageResult,
    process_timed,
)
from laion_assets.core.lake.errors import LaionAssetsError

DECODER_RETRIES = 1  # a sample whose worker dies this many times more is failed_decode
DECODE_TIMEOUT_S = 60.0  # CPU time one image may take before its worker is killed


class _Worker:
    """One decode process speaking imaging.worker_main's pipe protocol."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @classmethod
    async def start(cls, icfg_json: str) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER_CMD, icfg_json,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 20,
        )
        try:
            await proc.stdout.readexactly(1)  # ready: imports done
        except asyncio.IncompleteReadError:
            raise LaionAssetsError("an image decode worker died while starting (its error is on stderr)") from None
        return cls(proc)

    async def call(self, body: bytes, boxes) -> ImageResult:
        boxes_json = b"" if boxes is None else json.dumps(boxes).encode()
        self.proc.stdin.write(struct.pack("<Q", len(body)))
        self.proc.stdin.write(body)
        self.proc.stdin.write(struct.pack("<Q", len(boxes_json)))
        self.proc.stdin.write(boxes_json)
        await self.proc.stdin.drain()
        n = struct.unpack("<Q", await self.proc.stdout.readexactly(8))[0]
        return pickle.loads(await self.proc.stdout.readexactly(n))

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.stdin.close()
                await asyncio.wait_for(self.proc.wait(), 5)
            except (asyncio.TimeoutError, OSError):
                self.kill()
                await self.proc.wait()


class CpuPool:
    """Decode/resize/encode on `workers` worker processes (or threads). A worker that dies
    on a sample is replaced and the sample retried, then failed; one that takes longer than
    DECODE_TIMEOUT_S is killed and its sample failed."""

    def __init__(self, icfg: ImageConfig, workers: int, mode: str):
        self.icfg, self.workers, self.mode = icfg, workers, mode
        self.icfg_json = icfg.model_dump_json()
        self.threads = ThreadPoolExecutor(workers, thread_name_prefix="image") if mode == "thread" else None
        self.processor = ImageProcessor(icfg)
        self.idle: asyncio.Queue[_Worker] | None = None
        self.all: set[_Worker] = set()
        self.retired: set[_Worker] = set()  # killed, reaped at shutdown (before the loop closes)
        self.busy = 0  # samples being decoded now

    async def start(self) -> None:
        if self.mode == "process":
            self.idle = asyncio.Queue()
            for w in await asyncio.gather(*(self._spawn() for _ in range(self.workers))):
                self.idle.put_nowait(w)

    async def _spawn(self) -> _Worker:
        w = await _Worker.start(self.icfg_json)
        self.all.add(w)
        return w

    def _retire(self, w: _Worker) -> None:
        w.kill()
        self.all.discard(w)
        self.retired.add(w)

    async def run(self, body: bytes, boxes=None) -> ImageResult:
        """`boxes`: the row's blur boxes (images.bbox_col), None for none."""
        if self.mode == "thread":
            loop = asyncio.get_running_loop()
            self.busy += 1
            try:
                return await loop.run_in_executor(self.threads, process_timed, self.processor, body, boxes)
            finally:
                self.busy -= 1
        attempts = 0
        while attempts <= DECODER_RETRIES:
            w = await self.idle.get()
            if w.proc.returncode is not None:  # died idle (killed from outside): not this sample's fault
                self._retire(w)
                self.idle.put_nowait(await self._spawn())
                continue
            attempts += 1
            self.busy += 1
            try:
                async with asyncio.timeout(DECODE_TIMEOUT_S):
                    result = await w.call(body, boxes)
            except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError):
                self._retire(w)  # it died on this sample (or before): replace and retry
                self.idle.put_nowait(await self._spawn())
                continue
            except TimeoutError:
                self._retire(w)
                self.idle.put_nowait(await self._spawn())
                return ImageResult("failed_decode", f"decode took > {DECODE_TIMEOUT_S} s")
            except BaseException:  # cancelled mid-call: its pipe is out of step, so retire it
                self._retire(w)
                raise
            finally:
                self.busy -= 1
            self.idle.put_nowait(w)
            return result
        return ImageResult("failed_decode", "image decoder crashed (worker process died)")

    async def shutdown(self) -> None:
        if self.threads:
            self.threads.shutdown(wait=True, cancel_futures=True)
        await asyncio.gather(*(w.stop() for w in self.all | self.retired), return_exceptions=True)
        self.all.clear()
        self.retired.clear()
