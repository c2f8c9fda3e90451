"""Embeddings benchmark: a plain open_clip loop vs laion_assets' Encoder, same run, same images.

Both arms embed the same JPEG bytes (real photos from ../shared/data/real-photos and
scikit-image's bundled photos, randomly cropped/flipped, resized to 256 px short side, JPEG
q95 — what the images table stores) with the same model weights (random init, fixed seed: no
weights can be downloaded here) and the same precision:

  plain  the clip-retrieval way: per image PIL decode + the model's `preprocess`, stack, then
         `encode_image` under torch.no_grad, one batch after the other, nothing overlapped;
  ours   laion_assets.core.embeddings.encoder.Encoder: exact split preprocessing (uint8 on threads, ToTensor+
         Normalize per batch on the device), decode overlapped with the forward pass, fused
         SDPA attention, pinned memory + non_blocking copies on CUDA, optional nvJPEG decode.

Arms alternate for --rounds rounds (plain, ours, plain, ours ...) so background load hits both;
medians are reported. Peak memory is the peak RSS above the arm's starting RSS (sampled every
2 ms) on CPU, torch.cuda.max_memory_allocated on CUDA.

  python benchmarks/bench_embeddings.py                    # CPU, ViT-B-32, fp32, 256 images
  python benchmarks/bench_embeddings.py --device cuda --images 4096 --batch-size 512 \
      --workers 16 --gpu-decode                            # GPU (H100 target: >= 10k img/s)
"""

from __future__ import annotations

import argparse
import copy
import glob
import io
import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from laion_assets.core.embeddings.clip import fuse_attention, load_model  # noqa: E402
from laion_assets.core.embeddings.config import TINY_PRESETS, SpaceConfig  # noqa: E402
from laion_assets.core.embeddings.encoder import Encoder  # noqa: E402

SHARED = Path(os.environ.get("LAION_ASSETS_SHARED", REPO.parent / "shared"))


def source_photos() -> list[Image.Image]:
    paths = sorted(glob.glob(str(SHARED / "data" / "real-photos" / "*.jpg")))
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "camera.png", "coins.png",
                 "brick.png", "horse.png", "grass.png", "gravel.png", "page.png", "moon.png"]
        paths += [str(data / n) for n in names if (data / n).is_file()]
    except ImportError:
        pass
    if not paths:
        raise SystemExit("no source photos: need ../shared/data/real-photos or scikit-image")
    return [Image.open(p).convert("RGB") for p in paths]


def make_blobs(n: int, short_side: int = 256, seed: int = 0) -> list[bytes]:
    """n distinct JPEGs (q95, short side 256) from random crops/flips of real photos."""
    rng = np.random.default_rng(seed)
    photos = source_photos()
    blobs = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        s = rng.uniform(0.6, 1.0)
        cw, ch = max(16, int(w * s)), max(16, int(h * s))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        c = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            c = c.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        r = short_side / min(c.size)
        c = c.resize((max(short_side, round(c.size[0] * r)), max(short_side, round(c.size[1] * r))), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        c.save(buf, "JPEG", quality=95)
        blobs.append(buf.getvalue())
    return blobs


class PeakMemory:
    """Peak memory of one arm above its starting point: RSS on CPU, allocator peak on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        self.mib = (self.peak - self.start) / 2**20


def plain_loop(model, preprocess, blobs, batch_size, device, autocast_dtype) -> np.ndarray:
    """clip-retrieval style: decode + preprocess a batch, encode it, repeat."""
    out = []
    for start in range(0, len(blobs), batch_size):
        batch = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs[start:start + batch_size]])
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            emb = model.encode_image(batch.to(device))
            emb = emb.float()
            emb /= emb.norm(dim=-1, keepdim=True)
        out.append(emb.cpu().numpy())
    return np.concatenate(out)


def gemm_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate (GFLOP/s) of this machine at this precision: the ceiling of a
    ViT forward, which is almost all matmuls."""
    n = 4096
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = 0.0
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def flops_per_image(model, batch: torch.Tensor, autocast_dtype) -> float:
    """The image tower's FLOPs per image (torch's FlopCounterMode: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter, torch.autocast(
        batch.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
    ):
        model.encode_image(batch)
    return counter.get_total_flops() / batch.shape[0]


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    mem = PeakMemory(device)
    with mem:
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return result, dt, mem.mib


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--precision", default="auto", help="auto (fp32 CPU, bf16 GPU) | fp32 | bf16 | fp16")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=None, help="ours (default: 32 CPU, 512 GPU)")
    ap.add_argument("--plain-batch-size", type=int, default=None, help="plain loop (default: same as ours)")
    ap.add_argument("--workers", type=int, default=None, help="decode threads (default: all cores)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--prefetch", type=int, default=None,
                    help="batches decoded ahead of the forward (default: 0 on CPU, take turns; 2 on GPU)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gpu-decode", action="store_true", help="nvJPEG decode + GPU resize (approximate)")
    ap.add_argument("--compile", action="store_true", help="torch.compile ours (warm-up excluded from timing)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    clip = load_model(SpaceConfig(model=args.model, pretrained=None), args.device, args.precision)  # seed 0 random init, fused attention
    device = clip.device
    bs = args.batch_size or (512 if device.type == "cuda" else 32)
    plain_bs = args.plain_batch_size or bs
    encoder = Encoder(clip, bs, args.workers, prefetch=args.prefetch, gpu_decode=args.gpu_decode, compile=args.compile)
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same weights as ours, stock open_clip modules
        plain_model, _, preprocess = open_clip.create_model_and_transforms(TINY_PRESETS.get(args.model, args.model), pretrained=None, device=device)
    plain_model.eval()
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(clip.precision)

    blobs = make_blobs(args.images)
    print(f"{len(blobs)} JPEGs, mean {np.mean([len(b) for b in blobs]) / 1024:.1f} KiB; model {args.model} "
          f"(random init), device {device}, precision {clip.precision}, batch {bs} (plain {plain_bs}), "
          f"decode workers {encoder.workers}, prefetch {encoder.prefetch}, torch threads {torch.get_num_threads()}, "
          f"gpu_decode {encoder.gpu_decode}, compile {args.compile}", flush=True)

    def run_plain():
        return plain_loop(plain_model, preprocess, blobs, plain_bs, device, autocast_dtype)

    def run_ours():
        return encoder.images(blobs)

    warm = blobs[: min(len(blobs), 2 * max(bs, plain_bs))]
    plain_loop(plain_model, preprocess, warm, plain_bs, device, autocast_dtype)
    t0 = time.perf_counter()
    encoder.images(warm)
    print(f"warm-up (ours{', incl. torch.compile' if args.compile else ''}): {time.perf_counter() - t0:.1f} s", flush=True)

    res = {"plain": [], "ours": [], "plain_mib": [], "ours_mib": []}
    for r in range(args.rounds):
        for arm, fn in (("plain", run_plain), ("ours", run_ours)):
            out, dt, mib = timed(fn, device)
            res[arm].append(len(blobs) / dt)
            res[f"{arm}_mib"].append(mib)
            res[f"{arm}_out"] = out
            print(f"round {r + 1} {arm:5s} {len(blobs) / dt:9.1f} images/s  peak +{mib:7.1f} MiB", flush=True)
    diff = float(np.abs(res.pop("plain_out") - res.pop("ours_out")).max())
    probe = torch.zeros((4, 3, *clip.model.visual.image_size), device=device)
    counted = copy.deepcopy(plain_model)  # nn.MultiheadAttention's fast path is invisible to the
    fuse_attention(counted)                # counter; the same maths through fused SDPA is not
    plain_flops = flops_per_image(counted, probe, autocast_dtype)
    ours_flops = flops_per_image(clip.model, probe, autocast_dtype)
    peak = gemm_peak(device, autocast_dtype or torch.float32)
    plain_rate = statistics.median(res["plain"])
    sample = blobs[:64]
    t0 = time.perf_counter()
    for b in sample:
        encoder.prep.pixels(b)
    prep_s = (time.perf_counter() - t0) / len(sample)  # decode + resize + crop, one core
    cores = os.cpu_count() or 1
    forward_s = ours_flops / 1e9 / peak
    # On CPU the forward and the preprocessing share the cores; on a GPU they run side by side.
    ceiling = 1 / (forward_s + prep_s / cores) if device.type == "cpu" else 1 / max(forward_s, prep_s / cores)
    print(f"roofline: measured {clip.precision} matmul peak {peak:.0f} GFLOP/s; image tower "
          f"{plain_flops / 1e9:.2f} GFLOP/image plain, {ours_flops / 1e9:.2f} ours; the plain loop runs "
          f"{plain_rate * plain_flops / 1e9:.0f} GFLOP/s ({100 * plain_rate * plain_flops / 1e9 / peak:.0f}% of peak); "
          f"preprocessing {prep_s * 1e3:.2f} ms/image on one of {cores} cores. Ours with every matmul at peak and "
          f"nothing else costing time: {ceiling:.0f} images/s = {ceiling / plain_rate:.2f}x the plain loop "
          f"(the most any pipeline could gain here)", flush=True)
    summary = {
        "model": args.model, "device": str(device), "precision": clip.precision, "images": len(blobs),
        "batch_size": bs, "plain_batch_size": plain_bs, "workers": encoder.workers, "prefetch": encoder.prefetch,
        "torch_threads": torch.get_num_threads(), "gpu_decode": encoder.gpu_decode, "compile": encoder.compile,
        "plain_images_per_s": round(statistics.median(res["plain"]), 1),
        "ours_images_per_s": round(statistics.median(res["ours"]), 1),
        "ratio": round(statistics.median(res["ours"]) / statistics.median(res["plain"]), 2),
        "ratio_per_round": [round(o / p, 2) for o, p in zip(res["ours"], res["plain"])],
        "plain_peak_mib": round(statistics.median(res["plain_mib"]), 1),
        "ours_peak_mib": round(statistics.median(res["ours_mib"]), 1),
        "max_abs_diff_embeddings": diff,
        "gflop_per_image_plain": round(plain_flops / 1e9, 3), "gflop_per_image_ours": round(ours_flops / 1e9, 3),
        "matmul_peak_gflops": round(peak), "plain_fraction_of_peak": round(plain_rate * plain_flops / 1e9 / peak, 3),
        "preprocess_ms_per_image": round(prep_s * 1e3, 2), "ceiling_images_per_s": round(ceiling, 1),
        "ceiling_ratio": round(ceiling / plain_rate, 2),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
