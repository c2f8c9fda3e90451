"""Adopting published embeddings against embedding-reader, on the same files, in the same run.

    .venv/bin/python benchmarks/bench_adopt.py [--rows 2000000] [--rows-per-file 250000] [--rounds 3]

Writes `--rows` float16 768-d unit vectors (LAION-5B's L/14 width) with text embeddings and
LAION-style metadata in the parquet_npy layout (parts of `--rows-per-file`), then, alternating, `--rounds`
times each, in a fresh child process:

- **embedding-reader**: `EmbeddingReader(..., file_format="parquet_npy")` reading every image
  vector and its URL/TEXT metadata into numpy (what LAION's tools do with these files);
- **adopt**: what `laion-assets adopt-embeddings` does per part, without Dagster's run
  bookkeeping: the whole-part check (rows, dimension, NaN, norms), raw_urls (LAION uids, every
  metadata column kept) and embeddings/<space> audited by the gate and published as a Delta table.

Prints rows/s (median of the rounds), their ratio, and each arm's peak memory (VmHWM of the
child) at `--rows` and at a quarter of it (a quarter of the parts): flat in rows means the same
peak at both. embedding-reader reads the image vectors; adopt reads image and text vectors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_folder(root: Path, rows: int, per_file: int) -> None:
    from laion_assets_tests.published import write_parquet_npy

    per = [min(per_file, rows - start) for start in range(0, rows, per_file)]
    for k, n in enumerate(per):  # one part at a time: the writer holds one part in memory
        write_parquet_npy(root / f"part{k}", [n], seed=k, base_url=f"http://127.0.0.1:9/part{k}")
        for sub in ("metadata", "img_emb", "text_emb"):
            (root / sub).mkdir(exist_ok=True)
            src = next((root / f"part{k}" / sub).iterdir())
            src.rename(root / sub / src.name.replace("0000", f"{k:04d}"))
        shutil.rmtree(root / f"part{k}")


def arm_reader(folder: str) -> dict:
    from embedding_reader import EmbeddingReader

    started = time.perf_counter()  # imports before: both arms are timed at their steady rate
    reader = EmbeddingReader(
        embeddings_folder=f"{folder}/img_emb", metadata_folder=f"{folder}/metadata",
        meta_columns=["URL", "TEXT"], file_format="parquet_npy",
    )
    rows = 0
    for emb, meta in reader(batch_size=250_000, show_progress=False):
        rows += emb.shape[0]
    return {"rows": rows, "seconds": time.perf_counter() - started}


def arm_adopt(folder: str, lake_dir: str) -> dict:
    from laion_assets.core.config import PipelineConfig
    from laion_assets.core.embeddings.published import find_parts
    from laion_assets.core.ingest import registry
    from laion_assets.core.lake.delta import Lake
    from laion_assets.core.stages import run_raw_urls
    from laion_assets.core.stages.adopt import adopted_space, check_part, run_adopted_embeddings

    cfg = PipelineConfig.model_validate({"embeddings": {"spaces": {"l14": {"model": "ViT-L-14", "pretrained": "openai", "adopted": True}}}, "subsets": []})
    lake = Lake(lake_dir)
    _, dim = adopted_space(cfg, "l14")  # imports open_clip's model configs (and torch)
    import great_expectations  # noqa: F401 (the gates' library: imported once per process, not per part)

    started = time.perf_counter()
    parts = find_parts(folder)
    for part in parts:
        check_part(part, "l14", dim, cfg.quality.embedding_norm_tolerance)
    rows = 0
    for key in registry.register(lake, [p.metadata for p in parts]):
        run_raw_urls(lake, cfg, key)
        rows += run_adopted_embeddings(lake, cfg, key, "l14").rows
    return {"rows": rows, "seconds": time.perf_counter() - started}


def child(arm: str, folder: str) -> dict:
    """One arm in a fresh process (its own page-cache-warm files, its own peak memory)."""
    lake = tempfile.mkdtemp(prefix="bench-adopt-lake-")
    code = (
        f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.bench_adopt import *; "
        f"r = arm_{arm}({folder!r}{', ' + repr(lake) if arm == 'adopt' else ''}); r['peak_mb'] = peak_rss_mb(); print(json.dumps(r))"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    finally:
        shutil.rmtree(lake, ignore_errors=True)
    return json.loads(out.strip().splitlines()[-1])


def measure(folder: Path, rounds: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {"reader": [], "adopt": []}
    for _ in range(rounds):
        for arm in results:
            r = child(arm, str(folder))
            results[arm].append(r)
            print(f"  {arm:<7} {r['rows']:>9} rows in {r['seconds']:7.2f} s = {r['rows'] / r['seconds']:>9.0f} rows/s, peak {r['peak_mb']:.0f} MB", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--rows-per-file", type=int, default=250_000, help="LAION-5B's parts hold ~1M rows (memory does not grow with it but the gate's frame does)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for the generated files (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-adopt-"))
    summary = {}
    for rows in (args.rows // 4, args.rows):
        folder = work / f"rows{rows}"
        if not (folder / "metadata").is_dir():
            print(f"writing {rows} rows, {args.rows_per_file} per part, to {folder}", flush=True)
            write_folder(folder, rows, args.rows_per_file)
        print(f"{rows} rows:", flush=True)
        res = measure(folder, args.rounds if rows == args.rows else 1)
        rate = {arm: statistics.median(r["rows"] / r["seconds"] for r in runs) for arm, runs in res.items()}
        peak = {arm: max(r["peak_mb"] for r in runs) for arm, runs in res.items()}
        summary[rows] = {"rate": rate, "peak": peak}
        print(f"  median rows/s: embedding-reader {rate['reader']:.0f}, adopt {rate['adopt']:.0f}: ratio {rate['adopt'] / rate['reader']:.2f}x", flush=True)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
