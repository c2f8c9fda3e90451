"""Decode, check, resize and re-encode one image: the CPU half of the images stage.

Same resize semantics as img2dataset (no, border, keep_ratio, keep_ratio_largest,
center_crop; resize_only_if_bigger; white borders; its filters in its order; its box blur),
checked against img2dataset itself by test_img2dataset_parity.py. JPEGs are decoded at a
reduced DCT scale when the target is much smaller (Pillow's `draft`), which is where most of
the CPU time goes on large photos.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from laion_assets.core.images.blur import blur_boxes, parse_boxes
from laion_assets.core.images.config import ImageConfig

DOWNSCALE = {
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
PIL_FORMAT = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
# Decoders tried on downloaded bytes: the web's image formats only (less attack surface and
# no probing of every Pillow plugin for bytes that are not an image).
DECODERS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "ICO", "AVIF")
MIME = {"jpg": "image/jpeg", "webp": "image/webp", "png": "image/png"}


@dataclass(slots=True)
class ImageResult:
    status: str  # success | failed_decode | too_small | bad_aspect_ratio | too_large
    error: str | None = None
    original_width: int | None = None
    original_height: int | None = None
    width: int | None = None
    height: int | None = None
    image: bytes | None = None
    phash: str | None = None  # 64-bit pHash of the decoded picture, 16 hex digits
    cpu_s: float = 0.0  # CPU time of decode/check/resize/encode (the benchmark's breakdown)


# The 8 lowest DCT-II frequencies over 32 samples, unnormalised (scipy.fftpack.dct's default).
_DCT8 = 2 * np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)


def perceptual_hash(img: Image.Image) -> str:
    """pHash of the picture (before any crop or border) as 16 hex digits, bit for bit what
    `imagehash.phash` gives (grey, 32x32 Lanczos, 8x8 low DCT frequencies above their median;
    tested against it), on a box-reduced copy at least 64 px a side (a third of the CPU, the same
    hash within a bit or two). Not imagehash itself: it imports scipy in every decode worker
    (~0.7 s before the first image), which let fetched bodies pile up at start."""
    factor = min(img.size) // 64
    small = (img.reduce(factor) if factor > 1 else img).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    low = _DCT8 @ np.asarray(small, dtype=np.float64) @ _DCT8.T
    return f"{int(''.join('1' if b else '0' for b in (low > np.median(low)).ravel()), 2):016x}"


def process_timed(proc: ImageProcessor, body: bytes, boxes=None) -> ImageResult:
    """The processed image with the CPU time it took (the digests of the bytes are the
    fetcher's, taken as they streamed in)."""
    t = time.thread_time()
    res = proc(body, boxes)
    res.cpu_s = time.thread_time() - t
    return res


def resizes(w: int, h: int, cfg: ImageConfig) -> bool:
    """Whether the resize mode acts on the image at all: with `resize_only_if_bigger` an image
    whose side the mode scales by (the smaller one for keep_ratio and center_crop, the larger
    for keep_ratio_largest and border) is at most `size` is left as it is, not even cropped or
    padded (img2dataset's rule)."""
    if cfg.resize_mode == "no":
        return False
    if not cfg.resize_only_if_bigger:
        return True
    side = min(w, h) if cfg.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
    return side > cfg.size


def target_size(w: int, h: int, cfg: ImageConfig) -> tuple[int, int]:
    """Size the image is scaled to before any crop or border."""
    s = cfg.size
    if not resizes(w, h, cfg):
        return w, h
    if cfg.resize_mode in ("keep_ratio", "center_crop"):
        k = s / min(w, h)
    else:  # keep_ratio_largest, border
        k = s / max(w, h)
    return max(1, round(w * k)), max(1, round(h * k))


def _available(names) -> tuple[str, ...]:
    Image.init()
    return tuple(n for n in names if n in Image.OPEN)


_DECODERS = _available(DECODERS)


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "not an image: HTML/XML document"
    return "not an image: unknown format"


class ImageProcessor:
    """One configured processor, called once per downloaded image (thread-safe)."""

    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg
        self.fmt = PIL_FORMAT[cfg.format]

    def __call__(self, data: bytes, boxes=None) -> ImageResult:
        """`boxes`: the row's `bbox_col` value, regions to blur (None: nothing to blur)."""
        cfg = self.cfg
        try:
            with warnings.catch_warnings():
                # our own max_decode_pixels check below decides (Pillow still refuses > 2x its limit)
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=_DECODERS)
                w, h = img.size
        except UnidentifiedImageError:
            return ImageResult("failed_decode", _sniff(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return ImageResult("failed_decode", f"decompression bomb guard: {e}")
        except Exception as e:  # corrupt headers raise many kinds
            return ImageResult("failed_decode", f"{type(e).__name__}: {e}")
        if w * h > cfg.max_decode_pixels:
            return ImageResult("failed_decode", f"decompression bomb guard: {w}x{h} pixels", w, h)
        res = ImageResult("success", None, w, h)
        if min(w, h) < cfg.min_image_size:
            res.status, res.error = "too_small", f"{w}x{h} < min_image_size {cfg.min_image_size}"
            return res
        if cfg.max_image_area and w * h > cfg.max_image_area:  # before the aspect ratio, as img2dataset
            res.status, res.error = "too_large", f"{w}x{h} > max_image_area {cfg.max_image_area}"
            return res
        if cfg.max_aspect_ratio and max(w, h) / min(w, h) > cfg.max_aspect_ratio:
            res.status, res.error = "bad_aspect_ratio", f"{w}x{h} aspect > {cfg.max_aspect_ratio}"
            return res
        try:
            blur = parse_boxes(boxes)
        except ValueError as e:
            res.status, res.error = "failed_decode", f"{cfg.bbox_col}: {e}"
            return res
        try:
            res.image, (res.width, res.height), res.phash = self._transform(img, w, h, data, blur)
        except Exception as e:  # truncated or corrupt pixel data shows up only on load
            return ImageResult("failed_decode", f"{type(e).__name__}: {e}", w, h)
        return res

    def _filter(self, size: tuple[int, int], target: tuple[int, int]) -> Image.Resampling:
        """img2dataset's choice: area averaging to shrink (cv2.INTER_AREA ~ Pillow's BOX),
        Lanczos to enlarge; `downscale_filter` picks another filter for shrinking."""
        if target[0] >= size[0] and target[1] >= size[1]:
            return Image.Resampling.LANCZOS
        return DOWNSCALE[self.cfg.downscale_filter]

    def _transform(self, img: Image.Image, w: int, h: int, data: bytes, blur: list) -> tuple[bytes, tuple[int, int], str]:
        cfg = self.cfg
        orientation = img.getexif().get(0x0112, 1)
        rotated = orientation in (5, 6, 7, 8)
        shown = (h, w) if rotated else (w, h)  # displayed orientation
        tw, th = target_size(*shown, cfg)
        framed = resizes(*shown, cfg) and cfg.resize_mode in ("center_crop", "border")
        if (
            cfg.skip_reencode
            and img.format == self.fmt
            and orientation == 1
            and (tw, th) == (w, h)
            and (not framed or (w, h) == (cfg.size, cfg.size))
            and not blur
            and img.mode not in ALPHA_MODES
            and "transparency" not in img.info
        ):
            img.load()  # still verify the pixels decode
            return data, (w, h), perceptual_hash(img)
        if img.format in ("JPEG", "MPO") and tw * th < w * h:
            # decode at 1/2, 1/4 or 1/8 scale, never below the target (stored orientation)
            img.draft("RGB", (th, tw) if rotated else (tw, th))
        if orientation != 1:
            img = ImageOps.exif_transpose(img)  # copies: only when there is something to do
        if img.mode in ("L", "RGB") and "transparency" not in img.info:
            # resize first: a grey image costs a third to resample, then becomes RGB
            if img.size != (tw, th):
                img = img.resize((tw, th), self._filter(img.size, (tw, th)), reducing_gap=3.0)
            img = _to_rgb(img)
        else:
            img = _to_rgb(img)
            if img.size != (tw, th):
                img = img.resize((tw, th), self._filter(img.size, (tw, th)), reducing_gap=3.0)
        phash = perceptual_hash(img)
        img = blur_boxes(img, blur)  # after the resize, before crop or border (img2dataset's order)
        if framed and cfg.resize_mode == "center_crop":
            left, top = (tw - cfg.size) // 2, (th - cfg.size) // 2
            img = img.crop((left, top, left + cfg.size, top + cfg.size))
        elif framed and cfg.resize_mode == "border":
            canvas = Image.new("RGB", (cfg.size, cfg.size), cfg.border_color)
            canvas.paste(img, ((cfg.size - tw) // 2, (cfg.size - th) // 2))
            img = canvas
        buf = io.BytesIO()
        kwargs = {"quality": cfg.quality} if cfg.format in ("jpg", "webp") else {}
        img.save(buf, format=self.fmt, **kwargs)
        return buf.getvalue(), img.size, phash


ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with the picture intact: transparent images (alpha, or a transparent palette index or
    colour) on white; 16-bit, 32-bit and float greys scaled to 8 bits (Pillow's convert clips
    them, which turned a 16-bit PNG white); every other mode (1, L, P, CMYK, LAB, YCbCr) by
    Pillow's convert."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = _eight_bit(img)
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        img = img.convert("RGBA")
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img.convert("RGB")


def _eight_bit(img: Image.Image) -> Image.Image:
    """An 8-bit grey ("L") image from a 16-bit (I;16*), 32-bit integer (I) or float (F) one.

    16-bit modes scale by 1/257 (65535 -> 255). I and F carry no declared range, so it is read
    from the pixels: 0..1 (floats) is scaled by 255, 0..255 kept, 0..65535 scaled like 16-bit;
    anything else fails (failed_decode) rather than guessing."""
    import numpy as np

    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        scale = 257.0
    else:
        if not np.isfinite(a).all():
            raise ValueError(f"{img.mode} image has non-finite pixels")
        lo, hi = float(a.min()), float(a.max())
        if img.mode == "F" and lo >= 0 and hi <= 1:
            scale = 1 / 255
        elif lo >= 0 and hi <= 255:
            scale = 1.0
        elif lo >= 0 and hi <= 65535:
            scale = 257.0
        else:
            raise ValueError(f"{img.mode} pixels range {lo:g}..{hi:g}: no known 8-bit scale")
    return Image.fromarray(np.clip(np.rint(a / scale), 0, 255).astype(np.uint8))  # 2-D uint8: "L"


# -- worker process ------------------------------------------------------------------------
# The images stage decodes in worker processes it starts itself (`python -c ...worker_main()`):
# no multiprocessing (whose spawn re-imports the caller's __main__, and whose fork deltalake
# does not survive), a plain pipe protocol, and a crash or hang costs one worker, not the run.
# Request: 8-byte little-endian length + the downloaded bytes, then 8-byte length + the row's
# blur boxes as JSON (length 0: none). Reply: 8-byte length + pickle of the ImageResult. EOF on stdin ends the worker. A worker writes one
# byte, b"R", once its imports are done, so fetching starts when decoding can.

WORKER_CMD = "from laion_assets.core.images.imaging import worker_main; worker_main()"


def worker_main() -> None:
    import json
    import os
    import pickle
    import struct
    import sys

    proc = ImageProcessor(ImageConfig.model_validate_json(sys.argv[1]))
    for fd in (0, 1):
        _widen_pipe(fd)
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    out.write(b"R")
    out.flush()
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return
        body = inp.read(int.from_bytes(head, "little"))
        boxes = inp.read(int.from_bytes(inp.read(8), "little"))
        reply = pickle.dumps(process_timed(proc, body, json.loads(boxes) if boxes else None), protocol=5)
        out.write(struct.pack("<Q", len(reply)))
        out.write(reply)
        out.flush()


PIPE_BYTES = 1 << 20  # Linux's default ceiling for a pipe (/proc/sys/fs/pipe-max-size)


def _widen_pipe(fd: int) -> None:
    """A body (~150 KB) in one write: through a 64 KB pipe it went in pieces, one event-loop
    turn of the busy fetcher each, and the worker sat idle between them."""
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (AttributeError, OSError):  # not Linux, not a pipe, or above the ceiling: 64 KB it is
        pass
