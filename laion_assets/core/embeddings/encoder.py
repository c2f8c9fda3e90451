"""Batched, L2-normalised image and text embeddings through one or more towers (`clip` loads
them).

The image path is a pipeline, not a loop:

- the model's own open_clip transform is split in two. Everything before ``ToTensor`` (decode,
  resize, crop: PIL, which releases the GIL) runs per image on worker threads and writes
  uint8 pixels straight into the batch buffer (pinned memory on CUDA); ``ToTensor`` +
  ``Normalize`` run once per batch, vectorised, on the model's device. The values are the
  same as calling ``preprocess(img)`` image by image (same operations, same order: tested
  against the OpenAI golden tensor), at a quarter of the bytes to move and without per-image
  float tensors (small multithreaded torch ops that stall when the cores are busy).
- decoding runs on worker threads (not processes: deltalake panics in forked children). On a
  GPU the next batches decode while the model runs the current one; on a CPU decoding and the
  forward take turns, each on every core;
- uint8 batches go to the GPU with ``non_blocking`` copies from pinned memory, embeddings stay
  on the device until the end of the call (no per-batch sync);
- the attention blocks run ``F.scaled_dot_product_attention`` (flash / memory-efficient
  kernels on GPU, fused on CPU) instead of ``nn.MultiheadAttention``'s generic path, and the
  image tower's last block computes only the class token it pools.

Optional ``compile``: torch.compile of the image tower (inductor, weights frozen on CPU), one
static batch shape, after a 10-30 s warm-up; on the project's 2-core CPU it gained ~15 % before
the last-block pruning and ~5 % after, so it is opt-in.

Optional ``gpu_decode``: JPEGs decoded by nvJPEG (``torchvision.io.decode_jpeg`` on CUDA) and
resized on the GPU. It is close to, not identical with, PIL's decode + bicubic resize (see
``TENSOR_PATH_TOLERANCE``), so it is off unless asked for.
"""

from __future__ import annotations

import io
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

log = logging.getLogger(__name__)

# Max abs difference (normalised-tensor units) measured between the GPU-decode tensor path and
# PIL on real photos: nvJPEG/libjpeg IDCT and torch's antialiased bicubic differ by a few uint8
# levels on some pixels. The exact (default) path is within 1e-4 of open_clip's transform.
TENSOR_PATH_TOLERANCE = 0.25


def _decode(blob: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(blob))
    return img if img.mode == "RGB" else img.convert("RGB")


class Preprocess:
    """A tower's transform (open_clip's, or any torchvision Compose ending in ToTensor +
    Normalize), split at ``ToTensor``: ``pixels`` (PIL steps, per image, thread-safe) and
    ``finish`` (ToTensor + Normalize on a uint8 NHWC batch, vectorised).

    ``finish(stack(pixels(img)))`` equals ``stack(preprocess(img))``: the same float
    operations in the same order. Transforms of another shape fall back to per-image calls
    (``exact_split`` False)."""

    def __init__(self, preprocess):
        self.preprocess = preprocess
        steps = list(getattr(preprocess, "transforms", []))
        cut = next((i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)), None)
        tail = steps[cut + 1:] if cut is not None else []
        self.exact_split = cut is not None and all(isinstance(s, T.Normalize) for s in tail)
        self.pil_steps = steps[:cut] if self.exact_split else []
        self.normalize = [
            (torch.tensor(s.mean, dtype=torch.float32), torch.tensor(s.std, dtype=torch.float32))
            for s in (tail if self.exact_split else [])
        ]
        # geometry for the tensor (GPU decode) path: Resize(short side) + CenterCrop only
        self.resize = self.crop = None
        kinds = [type(s) for s in self.pil_steps if type(s).__name__ != "MaybeConvertMode"]
        if self.exact_split and kinds == [T.Resize, T.CenterCrop]:
            rs, cc = (s for s in self.pil_steps if type(s).__name__ != "MaybeConvertMode")
            size = rs.size if isinstance(rs.size, int) else (rs.size[0] if len(rs.size) == 1 else None)
            if size is not None and rs.max_size is None and rs.interpolation == T.InterpolationMode.BICUBIC:
                self.resize, self.crop = size, tuple(cc.size)

    def pixels(self, img: Image.Image | bytes) -> np.ndarray:
        """(H, W, 3) uint8 after decode (bytes), resize, crop; exact_split only."""
        if isinstance(img, bytes):
            img = _decode(img)
        for step in self.pil_steps:
            img = step(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)

    def full(self, img: Image.Image | bytes) -> torch.Tensor:
        """The transform as the model applies it: (3, H, W) float32."""
        return self.preprocess(_decode(img) if isinstance(img, bytes) else img)

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) on any device -> normalised float32 (N, 3, H, W), contiguous."""
        x = batch.permute(0, 3, 1, 2).float().div_(255)
        for mean, std in self.normalize:
            x.sub_(mean.to(x.device)[:, None, None]).div_(std.to(x.device)[:, None, None])
        return x.contiguous()

    def gpu_resize(self, img: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (crop_h, crop_w, 3) uint8: short side to `resize` with antialiased
        bicubic, rounded like PIL, then the same center crop as torchvision."""
        _, h, w = img.shape
        s = self.resize
        nh, nw = (s, max(1, int(s * w / h))) if h <= w else (max(1, int(s * h / w)), s)
        x = img.unsqueeze(0).float()
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        ch, cw = self.crop
        top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
        if top < 0 or left < 0:  # smaller than the crop: let the exact path pad it
            raise ValueError("image smaller than crop")
        x = x[0, :, top:top + ch, left:left + cw]
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


class Encoder:
    """Batched image encoding for one or more towers on one device: the CLIP image towers of
    several embedding spaces, or any model with ``preprocess``, ``device``, ``precision``,
    ``dim`` and ``forward(batch)`` (a pixel classifier). Each image is decoded once and every
    tower gets its own resize and crop of it, so a second space costs its forward pass, not a
    second decode. Text goes through the CLIP towers (``texts``)."""

    def __init__(self, towers, batch_size: int, workers: int | None = None, *,
                 prefetch: int | None = None, gpu_decode: bool = False, compile: bool = False,
                 text_batch_size: int | None = None):
        self.towers = list(towers) if isinstance(towers, (list, tuple)) else [towers]
        self.clip = self.towers[0]
        self.device = self.clip.device
        self.compile = compile  # torch.compile the image towers (opt-in: slow first batch)
        self._compiled: list = [None] * len(self.towers)
        self.batch_size = batch_size
        # Captions go in big batches, each padded to this shape (a shard's text vectors must not
        # depend on how it was batched). A padded row costs what a caption costs: a search
        # query, one text, is encoded in batches of 1.
        self.text_batch_size = text_batch_size or max(batch_size, 256)
        self.workers = workers or max(1, (os.cpu_count() or 1))
        # Batches decoded ahead of the forward pass. On a GPU, decoding overlaps the forward; on
        # a CPU both want every core (threads that steal a core from the forward stall its
        # other threads at each barrier), so they take turns: decode a batch on all workers,
        # then run the forward on all cores.
        self.prefetch = max(0, prefetch if prefetch is not None else (2 if self.device.type == "cuda" else 0))
        self.preps = [Preprocess(t.preprocess) for t in self.towers]
        self.prep = self.preps[0]
        self.gpu_decode = gpu_decode and self.device.type == "cuda" and all(p.resize is not None for p in self.preps)
        if gpu_decode and not self.gpu_decode:
            log.warning("gpu_decode needs CUDA and Resize+CenterCrop transforms: decoding on CPU")

    def _autocast(self, tower):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tower.precision)
        if dtype is None:
            return nullcontext()
        return torch.autocast(tower.device.type, dtype=dtype)

    # -- batches of preprocessed images, decoded once, ahead on worker threads --

    def _cpu_batch(self, blobs: list[bytes], pool: ThreadPoolExecutor):
        """Start decoding one batch; returns (per-tower uint8 buffers or None, futures)."""
        pin = self.device.type == "cuda"
        bufs = []
        for prep in self.preps:
            if not prep.exact_split:
                bufs.append(None)
                continue
            h, w = prep.crop or _probe_size(prep, blobs[0])
            bufs.append(torch.empty((len(blobs), h, w, 3), dtype=torch.uint8, pin_memory=pin))
        views = [b.numpy() if b is not None else None for b in bufs]

        def fill(i: int, blob: bytes) -> list:
            with _decode(blob) as img:
                loose = []  # per-image tensors of towers whose transform does not split
                for prep, view in zip(self.preps, views):
                    if view is not None:
                        view[i] = prep.pixels(img)
                        loose.append(None)
                    else:
                        loose.append(prep.full(img))
                return loose

        return bufs, [pool.submit(fill, i, b) for i, b in enumerate(blobs)]

    def _batches(self, blobs: Iterable[bytes], pool: ThreadPoolExecutor) -> Iterator[list[torch.Tensor]]:
        """Per tower, a normalised float batch on the device; `prefetch` batches decoded ahead."""
        it = iter(blobs)
        window: deque = deque()

        def submit() -> bool:
            chunk = [b for _, b in zip(range(self.batch_size), it)]
            if chunk:
                window.append(self._gpu_batch(chunk, pool) if self.gpu_decode else self._cpu_batch(chunk, pool))
            return bool(chunk)

        while len(window) < self.prefetch + 1 and submit():
            pass
        while window:
            bufs, futures = window.popleft()
            results = [f.result() for f in futures]
            if self.prefetch:
                submit()
            if callable(bufs):  # gpu decode: finish on this thread (CUDA work stays in order)
                yield bufs()
            else:
                yield [
                    prep.finish(buf.to(self.device, non_blocking=True)) if buf is not None
                    else torch.stack([r[k] for r in results]).to(self.device, non_blocking=True)
                    for k, (prep, buf) in enumerate(zip(self.preps, bufs))
                ]
            if not self.prefetch:
                submit()

    def _gpu_batch(self, blobs: list[bytes], pool: ThreadPoolExecutor):
        """nvJPEG batch decode (once) + GPU resize per tower; non-JPEG blobs and failures go
        the CPU way."""
        from torchvision.io import ImageReadMode, decode_jpeg

        jpeg = [i for i, b in enumerate(blobs) if b[:3] == b"\xff\xd8\xff"]

        def cpu_pixels(blob: bytes) -> list[np.ndarray]:
            with _decode(blob) as img:
                return [prep.pixels(img) for prep in self.preps]

        others = {i: pool.submit(cpu_pixels, b) for i, b in enumerate(blobs) if b[:3] != b"\xff\xd8\xff"}

        def finish() -> list[torch.Tensor]:
            out: list[list | None] = [None] * len(blobs)
            if jpeg:
                data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpeg]
                try:
                    decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                except RuntimeError:
                    decoded = [None] * len(jpeg)
                for i, img in zip(jpeg, decoded):
                    try:
                        out[i] = [prep.gpu_resize(img) for prep in self.preps] if img is not None else None
                    except ValueError:
                        out[i] = None
            for i, px in enumerate(out):
                if px is None:
                    fut = others.get(i) or pool.submit(cpu_pixels, blobs[i])
                    out[i] = [torch.from_numpy(p).to(self.device, non_blocking=True) for p in fut.result()]
            return [prep.finish(torch.stack([px[k] for px in out])) for k, prep in enumerate(self.preps)]

        return finish, []

    @torch.inference_mode()
    def encode(self, blobs: Iterable[bytes]) -> list[np.ndarray]:
        """Per tower, (n, dim) float32 (L2-normalised for CLIP towers), each image decoded once."""
        out: list[list[torch.Tensor]] = [[] for _ in self.towers]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="clip-prep") as pool:
            for batches in self._batches(blobs, pool):
                for k, (tower, batch) in enumerate(zip(self.towers, batches)):
                    with self._autocast(tower):
                        out[k].append(self._forward(k, batch).float())
        return [
            torch.cat(parts).cpu().numpy() if parts else np.zeros((0, tower.dim), np.float32)
            for tower, parts in zip(self.towers, out)
        ]

    def images(self, blobs: Iterable[bytes]) -> np.ndarray:
        """The first tower's (n, dim) float32, L2-normalised."""
        return self.encode(blobs)[0]

    def _forward(self, k: int, batch: torch.Tensor) -> torch.Tensor:
        """Tower k's forward on one static shape: a short batch is padded to `batch_size`, so
        the kernels (and their blocking) are the same for every batch and an image's vector
        does not depend on the images batched with it (bit for bit: without padding, 4 of 70
        float32 vectors changed with the batch around them). Through torch.compile when asked:
        inductor with weight freezing on CPU (oneDNN linear + fused epilogues). Any compile
        failure falls back to eager for the rest of the run."""
        tower = self.towers[k]
        n = batch.shape[0]
        if n < self.batch_size:
            batch = torch.cat([batch, batch.new_zeros((self.batch_size - n, *batch.shape[1:]))])
        if not self.compile:
            return tower.forward(batch)[:n]
        try:
            if self._compiled[k] is None:
                options = {"freezing": True} if self.device.type == "cpu" else None
                self._compiled[k] = torch.compile(tower.forward, dynamic=False, options=options)
            return self._compiled[k](batch)[:n]
        except Exception as e:  # no C++ compiler / triton, unsupported op: stay correct, go eager
            log.warning("torch.compile failed (%s): encoding eagerly", str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            self.compile = False
            return tower.forward(batch)[:n]

    @torch.inference_mode()
    def texts(self, captions: list[str | None], tower: int = 0) -> np.ndarray:
        """(n, dim) float32, L2-normalised, from CLIP tower `tower`'s text encoder; captions
        tokenised in bulk, a missing one as ''; batches padded to one shape, as images are."""
        clip = self.towers[tower]
        out = []
        bs = self.text_batch_size
        for start in range(0, len(captions), bs):
            part = [c or "" for c in captions[start : start + bs]]
            tokens = clip.tokenizer(part + [""] * (bs - len(part)))
            with self._autocast(clip):
                emb = clip.model.encode_text(tokens.to(clip.device, non_blocking=True))[: len(part)]
            out.append(F.normalize(emb.float(), dim=-1))
        if not out:
            return np.zeros((0, clip.dim), np.float32)
        return torch.cat(out).cpu().numpy()


def _probe_size(prep: Preprocess, blob: bytes) -> tuple[int, int]:
    return prep.pixels(blob).shape[:2]
