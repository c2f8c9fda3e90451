"""Adopting an img2dataset webdataset folder: rows/s of `adopt-images`' work (register, raw_urls
from the status parquet, images checked to decode and published), no request made.

The folder is written once (cached in --workdir) by img2dataset's own writer
(`img2dataset.writer.WebDatasetSampleWriter` and `logger.write_stats`, the classes its
downloader calls), so its layout is img2dataset's to the byte: one 10k-sample shard, as
img2dataset's default `number_sample_per_shard`, of real photos (../shared/data/real-photos,
random crops) stored at 256 px keep_ratio, q95, and 5% HTTP failures. Each round adopts it
into a fresh lake through the stage functions (no Dagster: the run bookkeeping is not
adoption's cost); rows/s is input rows over the wall time of raw_urls + images, median of rounds.

  .venv/bin/python benchmarks/bench_adopt_images.py [--n 10000] [--rounds 3] [--workdir /tmp/bench-adopt]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHOTOS = Path(os.environ.get("LAION_ASSETS_SHARED", REPO.parent / "shared")) / "data" / "real-photos"


def log(msg: str) -> None:
    print(msg, flush=True)


def write_folder(out: Path, n: int) -> None:
    """One img2dataset webdataset shard of `n` samples, by img2dataset's own writer."""
    import numpy as np
    import pyarrow as pa
    from img2dataset.logger import CappedCounter, write_stats
    from img2dataset.writer import WebDatasetSampleWriter
    from PIL import Image

    photos = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*.jpg"))]
    if not photos:
        raise SystemExit(f"no photos in {PHOTOS}: set LAION_ASSETS_SHARED to the shared folder")
    rng = np.random.default_rng(0)
    schema = pa.schema([
        ("url", pa.string()), ("caption", pa.string()), ("similarity", pa.float64()), ("key", pa.string()),
        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("original_width", pa.int32()), ("original_height", pa.int32()), ("exif", pa.string()), ("sha256", pa.string()),
    ])
    out.mkdir(parents=True)
    writer = WebDatasetSampleWriter(0, str(out), True, 5, schema, "jpg")
    started, ok = time.time(), 0
    for i in range(n):
        key = f"{i:09d}"
        meta = {"url": f"http://127.0.0.1:1/img/{i}.jpg", "caption": f"a photo number {i}", "similarity": float(rng.random()),
                "key": key, "status": "success", "error_message": None, "width": None, "height": None,
                "original_width": None, "original_height": None, "exif": None, "sha256": None}
        if rng.random() < 0.05:
            meta.update(status="failed_to_download", error_message="HTTP Error 404: Not Found")
            writer.write(None, key, meta["caption"], meta)
            continue
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        k = 256 / min(cw, ch)
        img = crop.resize((max(1, round(cw * k)), max(1, round(ch * k))), Image.Resampling.BOX)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        meta.update(width=img.width, height=img.height, original_width=cw, original_height=ch,
                    sha256=hashlib.sha256(buf.getvalue()).hexdigest())
        writer.write(buf.getvalue(), key, meta["caption"], meta)
        ok += 1
    writer.close()
    write_stats(str(out), 0, n, ok, n - ok, 0, started, time.time(), CappedCounter(), 5)


def adopt_once(folder: Path, lake_dir: Path) -> dict:
    from laion_assets.core import stages
    from laion_assets.core.config import PipelineConfig
    from laion_assets.core.ingest.img2dataset import register_folder
    from laion_assets.core.lake.delta import Lake

    shutil.rmtree(lake_dir, ignore_errors=True)
    lake, cfg = Lake(lake_dir), PipelineConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    (key,), _ = register_folder(lake, str(folder))
    raw = stages.run_raw_urls(lake, cfg, key)
    t1 = time.perf_counter()
    images = stages.run_images(lake, cfg, key)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"rows": raw.rows, "raw_urls_s": t1 - t0, "images_s": t2 - t1, "total_s": t2 - t0, "cpu_s": c2 - c0,
            "rows_per_s": raw.rows / (t2 - t0), "status_counts": images.stats["status_counts"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/bench-adopt")
    args = ap.parse_args()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    work = Path(args.workdir)
    folder = work / f"i2d-webdataset-{args.n}"
    if not (folder / "00000_stats.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        log(f"writing {folder} with img2dataset's writer ({args.n} samples, once)")
        write_folder(folder, args.n)
    size = sum(p.stat().st_size for p in folder.iterdir())
    rounds = []
    for r in range(args.rounds):
        res = adopt_once(folder, work / "lake")
        rounds.append(res)
        log(f"round {r + 1}: {res['rows']} rows in {res['total_s']:.2f} s (raw_urls {res['raw_urls_s']:.2f} s, "
            f"images {res['images_s']:.2f} s, {res['cpu_s']:.1f} CPU-s): {res['rows_per_s']:.0f} rows/s")
    summary = {
        "rows": rounds[0]["rows"], "folder_mib": round(size / 2**20, 1), "cores": os.cpu_count(),
        "rows_per_s_median": round(statistics.median(r["rows_per_s"] for r in rounds)),
        "images_stage_rows_per_s_median": round(statistics.median(r["rows"] / r["images_s"] for r in rounds)),
        "rounds_s": [round(r["total_s"], 2) for r in rounds], "cpu_s": [round(r["cpu_s"], 1) for r in rounds],
        # what the CPU time allows on idle cores (the wall rate is lower on a shared machine)
        "rows_per_cpu_s_median": round(statistics.median(r["rows"] / r["cpu_s"] for r in rounds)), "status_counts": rounds[0]["status_counts"],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
