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
from collections import deque
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
# Requests a worker holds at once: the next body waits in its pipe, not in the fetcher's event
# loop, so a worker never idles while the loop is busy fetching (one at a time, each worker
# waited for requests ~16% of a bench shard).
DEPTH = 2


class WorkerGone(ConnectionError):
    """The worker died while this sample waited behind another: not this sample's doing."""


class _Worker:
    """One decode process speaking imaging.worker_main's pipe protocol; replies come in request
    order and are handed to their callers by a reader task."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.owed: deque[asyncio.Future] = deque()  # one per request sent, oldest first
        self.reader = asyncio.create_task(self._read_replies())

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

    async def _read_replies(self) -> None:
        try:
            while True:
                n = struct.unpack("<Q", await self.proc.stdout.readexactly(8))[0]
                result = pickle.loads(await self.proc.stdout.readexactly(n))
                owed = self.owed.popleft()
                if not owed.done():  # a cancelled caller's reply is dropped
                    owed.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:  # dead: the sample it was on, and those queued behind it
            for i, owed in enumerate(self.owed):
                if not owed.done():
                    owed.set_exception(asyncio.IncompleteReadError(b"", None) if i == 0 else WorkerGone())
            self.owed.clear()

    def alive(self) -> bool:
        return self.proc.returncode is None and not self.reader.done()

    async def call(self, body: bytes, boxes) -> ImageResult:
        if not self.alive():
            raise WorkerGone()
        owed = asyncio.get_running_loop().create_future()
        boxes_json = b"" if boxes is None else json.dumps(boxes).encode()
        self.owed.append(owed)  # the request is written whole, with no await, so replies match
        self.proc.stdin.write(struct.pack("<Q", len(body)))
        self.proc.stdin.write(body)
        self.proc.stdin.write(struct.pack("<Q", len(boxes_json)))
        self.proc.stdin.write(boxes_json)
        try:
            await self.proc.stdin.drain()
        except ConnectionError:
            pass  # it died: the reader says whether on this sample or on one before it
        except BaseException:
            owed.cancel()
            raise
        return await owed

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
        await asyncio.gather(self.reader, return_exceptions=True)


class CpuPool:
    """Decode/resize/encode on `workers` worker processes (or threads), DEPTH requests each. A
    worker that dies on a sample is replaced and the sample retried, then failed (a sample that
    waited behind the one it died on is retried without counting); one that takes longer than
    DECODE_TIMEOUT_S is killed and its sample failed."""

    def __init__(self, icfg: ImageConfig, workers: int, mode: str):
        self.icfg, self.workers, self.mode = icfg, workers, mode
        self.icfg_json = icfg.model_dump_json()
        self.threads = ThreadPoolExecutor(workers, thread_name_prefix="image") if mode == "thread" else None
        self.processor = ImageProcessor(icfg)
        self.slots: asyncio.Queue[_Worker] | None = None  # each worker DEPTH times, while it may take one more
        self.all: set[_Worker] = set()
        self.retired: set[_Worker] = set()  # killed, reaped at shutdown (before the loop closes)
        self.busy = 0  # samples at the decoders now

    async def start(self) -> None:
        if self.mode == "process":
            self.slots = asyncio.Queue()
            for w in await asyncio.gather(*(_Worker.start(self.icfg_json) for _ in range(self.workers))):
                self._add(w)

    def _add(self, w: _Worker) -> None:
        self.all.add(w)
        for _ in range(DEPTH):
            self.slots.put_nowait(w)

    async def _replace(self, w: _Worker) -> None:
        """The first caller to find `w` gone starts its successor; its other slots are dropped."""
        if w not in self.all:
            return
        w.kill()
        self.all.discard(w)
        self.retired.add(w)
        self._add(await _Worker.start(self.icfg_json))

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
            w = await self.slots.get()
            if w not in self.all:  # a slot of a worker already replaced
                continue
            if not w.alive():  # died idle (killed from outside): not this sample's fault
                await self._replace(w)
                continue
            attempts += 1
            self.busy += 1
            try:
                async with asyncio.timeout(DECODE_TIMEOUT_S):
                    result = await w.call(body, boxes)
            except WorkerGone:
                attempts -= 1
                await self._replace(w)
                continue
            except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError):
                await self._replace(w)  # it died on this sample: replace and retry
                continue
            except TimeoutError:
                await self._replace(w)
                return ImageResult("failed_decode", f"decode took > {DECODE_TIMEOUT_S} s")
            except BaseException:  # cancelled: the reply is dropped when it comes
                self.slots.put_nowait(w)
                raise
            finally:
                self.busy -= 1
            self.slots.put_nowait(w)
            return result
        return ImageResult("failed_decode", "image decoder crashed (worker process died)")

    async def shutdown(self) -> None:
        if self.threads:
            self.threads.shutdown(wait=True, cancel_futures=True)
        await asyncio.gather(*(w.stop() for w in self.all | self.retired), return_exceptions=True)
        self.all.clear()
        self.retired.clear()
