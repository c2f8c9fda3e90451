"""Curation benchmark: the incremental dedup check per shard against a lake-wide key index,
and SemDeDup's precision / recall / fraction removed on a generated set with planted
near-duplicates.

Part 1 (`--part index`): a lake whose key index holds `--index-keys` entries (url, sha256 and
the pHash bands of every stored image, written shard by shard the way `curation/dedup_keys`
does), then `--rounds` new shards of `--shard-rows` rows (5% exact duplicates of earlier rows,
3% re-encoded copies 1-3 pHash bits away). Each new shard is checked in a fresh process
(`dedup_keys` for the shard, then the incremental duplicates pass), so its peak RSS is the
check's own; printed: seconds per step, rows/s, peak RSS and RSS above an idle process with
the same imports, and the index size on disk.

Part 2 (`--part semantic`): `--sem-rows` unit vectors (`--dim`) from a mixture of Gaussians,
plus near-copies (cosine 0.90-0.995) of 4% of them; SemDeDup with `--clusters` clusters at
several thresholds. A removal is correct when the row is in a planted group and at most
group size - 1 of the group are removed; precision = correct / removed, recall = correct /
planted removable, fraction = removed / rows. The vectors are generated batch by batch (never
all in memory), so the peak RSS at 1x and 2x rows shows memory bound by the clusters.

  python benchmarks/bench_dedup.py                        # both parts, 1M index keys
  python benchmarks/bench_dedup.py --part index --index-keys 1000000 --shard-rows 10000 --rounds 3 [--phash-distance 1]
  python benchmarks/bench_dedup.py --part semantic --sem-rows 50000 --dim 512 --clusters 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ENTRIES_PER_ROW = lambda distance: 2 + distance + 1  # noqa: E731  url, sha256, pHash bands


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent that
    forked it, so a measuring child reports its own)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shard_frame(shard: str, first_uid: int, rows: int, rng: np.random.Generator, earlier: list | None = None):
    """A shard's images rows: unique URLs, sha256s and pHashes, except the planted copies of
    `earlier` rows (exact duplicates: same URL and bytes; near: same picture re-encoded)."""
    import polars as pl

    uid = np.arange(first_uid, first_uid + rows, dtype=np.int64)
    url = [f"http://host{u % 997}.example.com/img/{u}.jpg" for u in uid]
    sha = [hashlib.sha256(int(u).to_bytes(8, "little", signed=True)).hexdigest() for u in uid]
    ph = rng.integers(0, 2**63, rows, dtype=np.int64).view(np.uint64) ^ rng.integers(0, 2, rows, dtype=np.uint64) << np.uint64(63)
    if earlier is not None:
        src = rng.choice(len(earlier[0]), int(rows * 0.08), replace=False)
        for j, s in enumerate(src):
            if j < int(rows * 0.05):
                url[j], sha[j] = earlier[0][s], earlier[1][s]
                ph[j] = earlier[2][s]
            else:
                flips = rng.choice(64, rng.integers(1, 4), replace=False)
                ph[j] = earlier[2][s] ^ np.uint64(sum(1 << int(b) for b in flips))
    return pl.DataFrame({
        "uid": uid, "url": url, "status": ["success"] * rows, "sha256": sha, "phash": [f"{int(p):016x}" for p in ph],
    })


def build_index(lake_dir: str, keys: int, shard_rows: int, seed: int, distance: int) -> dict:
    """Shards written the way the images and dedup_keys stages do, until the index has `keys` entries."""
    from laion_assets.core.curation import dedup
    from laion_assets.core.curation.config import DedupConfig
    from laion_assets.core.lake.delta import Lake

    lake, cfg = Lake(lake_dir), DedupConfig(phash_distance=distance)
    rows_total = keys // ENTRIES_PER_ROW(cfg.phash_distance)
    rng = np.random.default_rng(seed)
    started, shards, done = time.perf_counter(), 0, 0
    while done < rows_total:
        n = min(shard_rows * 5, rows_total - done)
        df = shard_frame(f"base-{shards:05d}", done, n, rng)
        lake.publish_shard("images", f"base-{shards:05d}", df)
        dedup.update_index(lake, f"base-{shards:05d}", cfg)
        done += n
        shards += 1
    build_s = time.perf_counter() - started
    t = time.perf_counter()
    full = dedup.run_pass(lake, cfg)
    return {"rows": done, "shards": shards, "entries": lake.table(dedup.INDEX).to_pyarrow_dataset().count_rows(),
            "build_s": round(build_s, 1), "full_pass_s": round(time.perf_counter() - t, 2), "full_pass_mode": full.mode}


def prepare_shard(lake_dir: str, shard: str, rows: int, seed: int) -> None:
    """A new shard's images (copies of earlier rows planted), published like the images stage does."""
    import polars as pl

    from laion_assets.core.lake.delta import Lake

    lake = Lake(lake_dir)
    sample = pl.scan_delta(lake.table_uri("images")).select("url", "sha256", "phash").head(200_000).collect()
    earlier = (sample["url"].to_list(), sample["sha256"].to_list(), np.array([int(h, 16) for h in sample["phash"]], np.uint64))
    lake.publish_shard("images", shard, shard_frame(shard, 10**12 + seed * rows, rows, np.random.default_rng(seed), earlier))


def measure_shard(lake_dir: str, shard: str, distance: int) -> dict:
    """The check for one new shard, alone in its process (its peak RSS is the check's): the
    shard's index entries, then the incremental pass."""
    import polars as pl

    from laion_assets.core.curation import dedup
    from laion_assets.core.curation.config import DedupConfig
    from laion_assets.core.lake.delta import Lake

    lake, cfg = Lake(lake_dir), DedupConfig(phash_distance=distance)
    rows = lake.shard_row_count("images", shard)
    t0 = time.perf_counter()
    keys = dedup.update_index(lake, shard, cfg)
    t1 = time.perf_counter()
    result = dedup.run_pass(lake, cfg)
    t2 = time.perf_counter()
    new = result.newly_marked.filter(pl.col("shard") == shard).group_by("kind").len()
    return {
        "keys_s": t1 - t0, "pass_s": t2 - t1, "rows": rows, "entries": keys["entries"], "mode": result.mode,
        "index_entries_read": result.rows_checked, "marked": dict(new.iter_rows()),
        "peak_rss_mb": peak_rss_mb(),
    }


def idle_rss() -> float:
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import benchmarks.bench_dedup as b, polars, deltalake; from laion_assets.core import dedup; print(b.peak_rss_mb())"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout)


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def part_index(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    try:
        lake_dir = str(tmp / "lake")
        print(f"building a key index of ~{args.index_keys:,} entries ...", flush=True)
        info = build_index(lake_dir, args.index_keys, args.shard_rows, args.seed, args.phash_distance)
        index_mb = dir_mb(Path(lake_dir) / "curation" / "dedup_keys")
        print(f"  {info['rows']:,} stored rows in {info['shards']} shards -> {info['entries']:,} index entries, "
              f"{index_mb:.1f} MiB on disk ({index_mb * 2**20 / info['entries']:.1f} B/entry); built in {info['build_s']} s; "
              f"first (full) pass over it: {info['full_pass_s']} s")
        idle = idle_rss()
        runs = []
        for r in range(args.rounds):
            shard = f"new-{r:03d}"
            subprocess.run([sys.executable, __file__, "--prepare-shard", lake_dir, shard, str(args.shard_rows), str(args.seed + 1 + r)],
                           cwd=REPO, check=True)
            out = subprocess.run([sys.executable, __file__, "--measure-shard", lake_dir, shard, str(args.phash_distance)],
                                 capture_output=True, text=True, cwd=REPO)
            if out.returncode:
                raise SystemExit(out.stderr)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(m)
            total = m["keys_s"] + m["pass_s"]
            print(f"  shard {r}: {m['rows']:,} rows, {m['entries']:,} entries; dedup_keys {m['keys_s']:.2f} s + pass "
                  f"{m['pass_s']:.2f} s ({m['mode']}, {m['index_entries_read']:,} index entries read) = {m['rows'] / total:,.0f} rows/s; "
                  f"marked {m['marked']}; peak RSS {m['peak_rss_mb']:.0f} MiB", flush=True)
        med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
        total = med("keys_s") + med("pass_s")
        print("\nincremental dedup check per shard (median of rounds)")
        d = args.phash_distance
        print(f"  index: {info['entries']:,} entries ({info['rows']:,} rows x {ENTRIES_PER_ROW(d)} keys: url, sha256, {d + 1} pHash bands "
              f"of ~{64 // (d + 1)} bits for phash_distance {d})")
        print(f"  shard of {args.shard_rows:,} rows: {total:.2f} s = {args.shard_rows / total:,.0f} rows/s "
              f"(dedup_keys {med('keys_s'):.2f} s, pass {med('pass_s'):.2f} s)")
        print(f"  peak RSS {med('peak_rss_mb'):.0f} MiB; an idle process with the same imports: {idle:.0f} MiB; "
              f"check's own: {med('peak_rss_mb') - idle:.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- part 2: SemDeDup ----------------------------------------------------------------------

def planted_stream(rows: int, dim: int, seed: int, batch: int = 4096):
    """(stream, truth): batches generated on the fly; 4% of rows get a near-copy (cosine
    0.90-0.995) in the same batch, with a uid above all originals."""
    rng0 = np.random.default_rng(seed)
    centers = rng0.normal(size=(max(8, rows // 500), dim)).astype(np.float32)
    # clusters of varying tightness: in the tightest, unrelated rows reach cosine ~0.9 (like
    # near-identical stock photos), so low thresholds remove some rows that are not copies
    spread = rng0.uniform(0.3, 1.2, len(centers)).astype(np.float32)

    def batch_of(i: int):
        rng = np.random.default_rng((seed, i))
        n = min(batch, rows - i * batch)
        c = rng.integers(0, len(centers), n)
        x = centers[c] + rng.normal(size=(n, dim)).astype(np.float32) * spread[c, None]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        src = rng.choice(n, int(n * 0.04), replace=False)
        target = rng.uniform(0.90, 0.995, len(src)).astype(np.float32)
        noise = rng.normal(size=(len(src), dim)).astype(np.float32)
        noise -= (noise * x[src]).sum(1, keepdims=True) * x[src]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        copies = x[src] * target[:, None] + noise * np.sqrt(1 - target**2)[:, None]
        uids = np.concatenate([np.arange(i * batch, i * batch + n), 10**9 + i * batch + src]).astype(np.int64)
        return uids, np.concatenate([x, copies]), [(i * batch + int(s), 10**9 + i * batch + int(s)) for s in src]

    nbatches = (rows + batch - 1) // batch

    def stream():
        for i in range(nbatches):
            uids, vecs, _ = batch_of(i)
            yield "bench", uids, vecs

    truth = [p for i in range(nbatches) for p in batch_of(i)[2]]
    return stream, rows + len(truth), truth


def score(removed: set[int], truth: list[tuple[int, int]], rows: int) -> dict:
    correct = sum(min(1, len(removed & set(pair))) for pair in truth)
    return {"removed": len(removed), "precision": correct / max(1, len(removed)), "recall": correct / len(truth),
            "fraction_removed": len(removed) / rows}


def run_semantic(rows: int, dim: int, clusters: int, threshold: float, seed: int) -> dict:
    from laion_assets.core.curation.config import SemanticDedupConfig
    from laion_assets.core.curation.semdedup import semdedup

    stream, total, truth = planted_stream(rows, dim, seed)
    t = time.perf_counter()
    result = semdedup(stream, total, SemanticDedupConfig(subset="bench", clusters=clusters, threshold=threshold, seed=seed))
    return {"threshold": threshold, "rows": total, "seconds": time.perf_counter() - t, "largest_cluster": result.largest_cluster,
            "peak_rss_mb": peak_rss_mb(), **score(set(result.removed["uid"].to_list()), truth, total)}


def part_semantic(args) -> None:
    print(f"\nSemDeDup: {args.sem_rows:,} rows + 4% planted near-copies (cosine 0.90-0.995), dim {args.dim}, k={args.clusters}")
    print("  threshold  removed  precision  recall  fraction removed  seconds")
    for thr in args.thresholds:
        r = run_semantic(args.sem_rows, args.dim, args.clusters, thr, args.seed)
        print(f"  {thr:9.3f}  {r['removed']:7,}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['fraction_removed']:16.4f}  {r['seconds']:7.1f}", flush=True)
    mem = []
    for scale in (1, 2):
        code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); sys.argv = ['x']; import benchmarks.bench_dedup as b; "
                f"print(json.dumps(b.run_semantic({args.sem_rows * scale}, {args.dim}, {args.clusters}, 0.95, {args.seed})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
        mem.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"  memory: peak RSS {mem[0]['peak_rss_mb']:.0f} MiB at {mem[0]['rows']:,} rows, {mem[1]['peak_rss_mb']:.0f} MiB at "
          f"{mem[1]['rows']:,} rows (same k; the vectors stream and spill to disk by cluster; largest cluster "
          f"{mem[1]['largest_cluster']:,})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["index", "semantic", "all"], default="all")
    p.add_argument("--index-keys", type=int, default=1_000_000)
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--phash-distance", type=int, default=4, help="curation.dedup.phash_distance (bands = distance + 1)")
    p.add_argument("--sem-rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.85, 0.9, 0.92, 0.95, 0.98])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prepare-shard", nargs=4, metavar=("LAKE", "SHARD", "ROWS", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--measure-shard", nargs=3, metavar=("LAKE", "SHARD", "DISTANCE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    if args.prepare_shard:
        lake, shard, rows, seed = args.prepare_shard
        prepare_shard(lake, shard, int(rows), int(seed))
        return
    if args.measure_shard:
        lake, shard, distance = args.measure_shard
        print(json.dumps(measure_shard(lake, shard, int(distance))))
        return
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    if args.part in ("index", "all"):
        part_index(args)
    if args.part in ("semantic", "all"):
        part_semantic(args)


if __name__ == "__main__":
    main()
