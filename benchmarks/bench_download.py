#!/usr/bin/env python3
"""Images stage vs img2dataset, in the same run, on the same URLs, with equal settings.

Serves the ../shared/bench corpus with nginx on 127.0.0.1 (never another address), then for
each round runs img2dataset (the anchor, ../shared/bench/run_img2dataset.sh) and our images
stage through the CLI (`laion-assets run urls.parquet --select raw_urls,images`), alternating
which goes first, both timed by ../shared/bench/measure.sh (wall time from process start to
exit, so startup, ingest and the Delta publish count). Our images table is exported to
OUTDIR/*.parquet with statuses mapped to img2dataset's three, and check_outcomes.py checks
every URL against faults.json. Prints images/s, the ratio, peak memory and per-status counts
side by side (medians over rounds) and writes OUT/summary.json.

Equal settings: 256 px, keep_ratio, jpg quality 95, 10 s timeouts, no retries. img2dataset
runs 2 processes x 32 threads (64 requests in flight, the harness's tuned setting); ours
keeps its defaults (concurrency sized from the machine) with per_host raised to 64, since
the whole corpus is one host and img2dataset has no per-host limit.

Setup it does itself when missing (reusing what is already there):
  nginx          from apt: `apt-get install -y nginx` (not installed by this script)
  img2dataset    `python3 -m venv I2D_VENV && I2D_VENV/bin/pip install img2dataset==1.47.0`
  corpus         ../shared/bench/make_corpus.py --out CORPUS -n N  (~3 min, ~700 MB at 5000)

  .venv/bin/python benchmarks/bench_download.py [--rounds 3] [--corpus /tmp/bench-corpus]
  .venv/bin/python benchmarks/bench_download.py profile      # where the time goes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(os.environ.get("BENCH_DIR", REPO.parent / "shared" / "bench"))
PY = sys.executable
CLI = str(Path(PY).parent / "laion-assets")
I2D_VERSION = "1.47.0"

CONFIG = """\
download:
  allowed_networks: ["127.0.0.1/32"]   # the bench server
  retries: 0
  connect_timeout_s: 10
  read_timeout_s: 10
  total_timeout_s: 30
  per_host: 64
  min_success_rate: 0.5
images:
  size: 256
  resize_mode: keep_ratio
  format: jpg
  quality: 95
"""

DAGSTER_YAML = """\
storage:
  sqlite:
    base_dir: {home}/storage
local_artifact_storage:
  module: dagster._core.storage.root
  class: LocalArtifactStorage
  config:
    base_dir: {home}
compute_logs:
  module: dagster._core.storage.noop_compute_log_manager
  class: NoOpComputeLogManager
telemetry:
  enabled: false
"""


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# -- setup -------------------------------------------------------------------------------------

def setup(args) -> bool:
    """Everything the rounds need; returns True when this script started nginx."""
    if not shutil.which("nginx"):
        sys.exit("nginx not found: install it from apt (apt-get update && apt-get install -y nginx)")
    venv = Path(args.i2d_venv)
    if not (venv / "bin" / "img2dataset").exists():
        log(f"creating {venv} with img2dataset {I2D_VERSION} (pip)")
        subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"img2dataset=={I2D_VERSION}"], check=True)
    corpus = Path(args.corpus)
    if not ((corpus / "urls.parquet").is_file() and (corpus / "faults.json").is_file()):
        log(f"generating the corpus in {corpus} (n={args.n}, a few minutes)")
        subprocess.run([PY, str(BENCH / "make_corpus.py"), "--out", str(corpus), "-n", str(args.n)], check=True)
    meta = json.loads((corpus / "faults.json").read_text())
    if meta["n"] != args.n:
        log(f"note: corpus has n={meta['n']} (not {args.n}); using it as it is")
    status = subprocess.run([str(BENCH / "serve.sh"), "status"], capture_output=True, text=True)
    if status.returncode == 0:
        log(f"nginx already running ({status.stdout.strip()})")
        return False
    subprocess.run([str(BENCH / "serve.sh"), "start", str(corpus)], check=True)
    return True


# -- memory sampler ------------------------------------------------------------------------------

def _tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Peak PSS summed over a process tree (shared pages counted once), sampled every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in _tree(self.pid)))
            self.stop.wait(0.2)


def measured(cmd: list[str], env: dict) -> float:
    proc = subprocess.Popen(cmd, env=env)
    mem = TreeMemory(proc.pid)
    mem.start()
    proc.wait()
    mem.stop.set()
    mem.join()
    return round(mem.peak_kb / 1024, 1)


# -- one round of each tool --------------------------------------------------------------------

def last_record(results: Path) -> dict:
    return json.loads(results.read_text().splitlines()[-1])


def run_i2d(args, out: Path, results: Path, r: int) -> dict:
    outdir = out / f"i2d-{r}"
    env = {**os.environ, "THREADS": str(args.threads), "PROCS": str(args.procs), "I2D_VENV": args.i2d_venv,
           "RESULTS": str(results), "PY": PY}
    peak = measured([str(BENCH / "run_img2dataset.sh"), args.corpus, str(outdir), "img2dataset"], env)
    rec = last_record(results)
    rec["peak_pss_mb"] = peak
    rec["statuses"] = rec.get("status_dict", {})
    rec["check"] = (outdir / "_bench" / "check.txt").read_text().strip().splitlines()[-1]
    return rec


def run_ours(args, out: Path, results: Path, r: int) -> dict:
    outdir, lake, home = out / f"ours-{r}", out / f"lake-{r}", out / f"dagster-{r}"
    shutil.rmtree(lake, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML.format(home=home))
    script = (
        f"{CLI} run {args.corpus}/urls.parquet --lake {lake} --config {out / 'bench.yaml'} --select raw_urls,images"
        f" && {PY} {Path(__file__).resolve()} export {lake} {outdir}"
    )
    timeline = out / f"timeline-{r}.jsonl"
    timeline.unlink(missing_ok=True)
    env = {**os.environ, "DAGSTER_HOME": str(home), "RESULTS": str(results), "PY": PY,
           "AWS_EC2_METADATA_DISABLED": "true", "GX_ANALYTICS_ENABLED": "False",
           "EXTRA": json.dumps({"tool": "laion-assets"}), "LAION_ASSETS_TIMELINE": str(timeline)}
    peak = measured([str(BENCH / "measure.sh"), args.corpus, str(outdir), "laion-assets", "--", "bash", "-c", script], env)
    rec = last_record(results)
    rec["peak_pss_mb"] = peak
    rec["timeline"] = [json.loads(line) for line in timeline.read_text().splitlines()] if timeline.is_file() else []
    rec["breakdown"] = breakdown(rec)
    rec["statuses"] = json.loads((outdir / "_bench" / "statuses.json").read_text()) if (outdir / "_bench" / "statuses.json").is_file() else {}
    rec["check"] = (outdir / "_bench" / "check.txt").read_text().strip().splitlines()[-1]
    shutil.rmtree(lake, ignore_errors=True)
    return rec


def export(lake: str, outdir: str) -> None:
    """Our images table -> OUTDIR/images.parquet with url, status (img2dataset's three),
    error_message; the fine statuses go to OUTDIR/_bench/statuses.json."""
    import polars as pl

    from laion_assets.core.images.download import I2D_STATUS

    df = pl.scan_delta(f"{Path(lake).resolve()}/images").select("url", "status", "error").collect()
    Path(outdir, "_bench").mkdir(parents=True, exist_ok=True)
    Path(outdir, "_bench", "statuses.json").write_text(json.dumps(dict(df.group_by("status").len().sort("len", descending=True).iter_rows())))
    df.select(
        "url", pl.col("status").replace_strict(I2D_STATUS).alias("status"), pl.col("error").alias("error_message")
    ).write_parquet(Path(outdir, "images.parquet"))


# -- report --------------------------------------------------------------------------------------

CORES = os.cpu_count() or 1


def breakdown(rec: dict) -> dict:
    """Where our wall seconds went, from the stage's timeline (env LAION_ASSETS_TIMELINE). In
    the download phase, core-seconds: the decode workers' CPU, digests and the rest of the main
    process (fetching, the event loop, staging), and what no one used (idle, of CORES cores; the
    server and other load on the machine land there too). Staging is the writer thread's wall
    (it overlaps fetching). Outside it, wall seconds: startup + raw_urls, audit + gate, publish."""
    samples = [x for x in rec["timeline"] if "t" in x]
    if not samples:
        return {}
    last, phases = samples[-1], {x["phase"]: x["s"] for x in rec["timeline"] if "phase" in x}
    dl = last["t"]
    b = {
        "download_wall_s": dl,
        "decode_resize_encode_cpu_s": last.get("decode_s", 0.0),
        "digests_cpu_s": last.get("digests_s", 0.0),
        "fetch_loop_staging_cpu_s": round(last["main_cpu_s"] - last.get("digests_s", 0.0), 2),
        "staging_wall_s": last.get("staging_s", 0.0),
        "idle_core_s": round(CORES * dl - last["main_cpu_s"] - last.get("decode_s", 0.0), 2),
        "audit_gate_s": phases.get("audit_gate", 0.0),
        "publish_s": phases.get("publish", 0.0),
    }
    b["startup_raw_urls_s"] = round(rec["wall_s"] - dl - b["audit_gate_s"] - b["publish_s"], 2)
    return b


def print_timeline(rec: dict) -> None:
    cols = ("t", "in_flight", "waiting_decode", "decoding", "done", "staged", "cpu_pct")
    print(f"\nour timeline, last round (one line a second; cpu_pct: main process + decode workers, {CORES * 100} = all cores)")
    print(" ".join(f"{c:>14}" for c in cols))
    for x in rec["timeline"]:
        if "t" in x:
            print(" ".join(f"{x[c]:>14}" for c in cols))

def three(rec: dict) -> dict:
    c = {"success": 0, "failed_to_download": 0, "failed_to_resize": 0, "missing": 0}
    for cat in rec["by_category"].values():
        for k, v in cat.items():
            c[k] = c.get(k, 0) + v
    return c


def report(i2d: list[dict], ours: list[dict], out: Path) -> dict:
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    s = {
        "rounds": len(ours),
        "img2dataset": {k: med(i2d, k) for k in ("img_per_s", "wall_s", "max_rss_mb", "peak_pss_mb", "user_s", "sys_s")},
        "laion_assets": {k: med(ours, k) for k in ("img_per_s", "wall_s", "max_rss_mb", "peak_pss_mb", "user_s", "sys_s")},
        "per_round": [{"img2dataset": a["img_per_s"], "laion_assets": b["img_per_s"]} for a, b in zip(i2d, ours)],
    }
    s["ratio"] = round(s["laion_assets"]["img_per_s"] / s["img2dataset"]["img_per_s"], 2)
    s["ratio_per_round"] = [round(b["img_per_s"] / a["img_per_s"], 2) for a, b in zip(i2d, ours)]
    s["median_ratio"] = statistics.median(s["ratio_per_round"])
    urls = sum(three(ours[-1]).values())
    for side, rs in (("img2dataset", i2d), ("laion_assets", ours)):
        s[side]["cpu_s_per_url"] = round(statistics.median((r["user_s"] + r["sys_s"]) / urls for r in rs), 5)
        s[side]["load_before"] = [r["load_before"] for r in rs]
    s["cpu_per_url_ratio"] = round(s["laion_assets"]["cpu_s_per_url"] / s["img2dataset"]["cpu_s_per_url"], 2)
    s["breakdown"] = {k: statistics.median(r["breakdown"].get(k, 0.0) for r in ours) for k in ours[-1]["breakdown"]}
    s["outcomes"] = {"img2dataset": three(i2d[-1]), "laion_assets": three(ours[-1])}
    s["statuses"] = {"img2dataset": i2d[-1]["statuses"], "laion_assets": ours[-1]["statuses"]}
    s["check"] = {"img2dataset": [r["check"] for r in i2d], "laion_assets": [r["check"] for r in ours]}
    s["mismatches"] = {"img2dataset": [r["mismatches"] for r in i2d], "laion_assets": [r["mismatches"] for r in ours]}
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    print_timeline(ours[-1])

    a, b = s["img2dataset"], s["laion_assets"]
    print(f"\n{'median of ' + str(len(ours)) + ' rounds':<34} {'img2dataset':>14} {'laion-assets':>14}")
    rows = [("images/s (successes / wall)", "img_per_s"), ("wall s (incl. startup)", "wall_s"),
            ("peak PSS, process tree (MB)", "peak_pss_mb"), ("max RSS, largest process (MB)", "max_rss_mb"),
            ("CPU user s", "user_s"), ("CPU sys s", "sys_s"), ("CPU s per URL", "cpu_s_per_url")]
    for label, k in rows:
        print(f"{label:<34} {a[k]:>14} {b[k]:>14}")
    print(f"{'ratio (ours / img2dataset)':<34} {'':>14} {s['ratio']:>14}")
    print(f"{'ratio per round (median)':<34} {'':>14} {str(s['ratio_per_round']) + ' ' + str(s['median_ratio']):>14}")
    print(f"{'CPU per URL ratio':<34} {'':>14} {s['cpu_per_url_ratio']:>14}")
    print(f"{'1-min load average before each run':<34} {str(a['load_before']):>14} {str(b['load_before']):>14}")
    print("our seconds, median of rounds:", ", ".join(f"{k} {v}" for k, v in s["breakdown"].items()))
    print(f"{'per round images/s':<34} {str([r['img2dataset'] for r in s['per_round']]):>14} {str([r['laion_assets'] for r in s['per_round']]):>14}")
    for k in ("success", "failed_to_download", "failed_to_resize", "missing"):
        print(f"{k:<34} {s['outcomes']['img2dataset'][k]:>14} {s['outcomes']['laion_assets'][k]:>14}")
    print("fine statuses, last round:")
    print(f"  img2dataset:  {s['statuses']['img2dataset']}")
    print(f"  laion-assets: {s['statuses']['laion_assets']}")
    print("check_outcomes.py (every round):")
    for tool in ("img2dataset", "laion_assets"):
        print(f"  {tool}: mismatches {s['mismatches'][tool]}; {s['check'][tool][-1]}")
    return s


def bench(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.corpus = str(Path(args.corpus).resolve())
    (out / "bench.yaml").write_text(CONFIG)
    results = out / "results.jsonl"
    started = setup(args)
    i2d, ours = [], []
    try:
        for r in range(args.rounds):
            order = [run_i2d, run_ours] if r % 2 == 0 else [run_ours, run_i2d]
            for fn in order:
                load = os.getloadavg()[0]
                rec = fn(args, out, results, r)
                rec["load_before"] = round(load, 1)
                (i2d if fn is run_i2d else ours).append(rec)
                log(f"round {r + 1}: {rec['label']}: {rec['img_per_s']} img/s, wall {rec['wall_s']:.1f} s, "
                    f"peak PSS {rec['peak_pss_mb']} MB, mismatches {rec['mismatches']} (load before {load:.1f})")
    finally:
        if started:
            subprocess.run([str(BENCH / "serve.sh"), "stop"], check=False)
    report(i2d, ours, out)


# -- profile -------------------------------------------------------------------------------------

def profile(args) -> None:
    """Where the time goes: CPU per image by step, network alone, then the stage by phase."""
    import asyncio
    import glob
    import hashlib
    import io
    import resource

    import polars as pl
    from PIL import Image

    from laion_assets.core import stages
    from laion_assets.core.config import load_config
    from laion_assets.core.images.download import ShardDownloader
    from laion_assets.core.images.fetch import Fetcher
    from laion_assets.core.images.imaging import ImageProcessor, target_size
    from laion_assets.core.ingest import registry
    from laion_assets.core.ingest.reader import shard_key
    from laion_assets.core.lake.delta import Lake

    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.yaml").write_text(CONFIG)
    cfg = load_config(out / "bench.yaml")
    started = setup(args)
    try:
        # 1. CPU per image, one core, by step (same code path as ImageProcessor)
        files = sorted(glob.glob(f"{args.corpus}/www/img/*"))[: args.sample]
        datas = [Path(f).read_bytes() for f in files]
        t = {"sha256": 0.0, "open+decode": 0.0, "resize": 0.0, "encode": 0.0}
        for d in datas:
            t0 = time.process_time()
            hashlib.sha256(d).hexdigest()
            t1 = time.process_time()
            img = Image.open(io.BytesIO(d))
            tw, th = target_size(*img.size, cfg.images)
            if img.format == "JPEG" and tw * th < img.size[0] * img.size[1]:
                img.draft("RGB", (tw, th))
            img.load()
            t2 = time.process_time()
            img = img.convert("RGB").resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
            t3 = time.process_time()
            img.save(io.BytesIO(), "JPEG", quality=95)
            t4 = time.process_time()
            for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                t[k] += v
        proc = ImageProcessor(cfg.images)
        t0 = time.process_time()
        for d in datas:
            proc(d)
        whole = (time.process_time() - t0) / len(datas) * 1000
        print(f"CPU per image over {len(datas)} corpus images (ms, one core): "
              + ", ".join(f"{k} {v / len(datas) * 1000:.2f}" for k, v in t.items()) + f"; ImageProcessor total {whole:.2f}")

        urls = pl.read_parquet(f"{args.corpus}/urls.parquet", columns=["url"])["url"].to_list()

        # 2. network alone: every URL fetched, bodies dropped (no decode)
        async def fetch_all():
            sem = asyncio.Semaphore(128)
            dcfg = cfg.download

            async def one(u):
                async with sem:
                    return await f.fetch(u)

            async with Fetcher(dcfg) as f:
                return await asyncio.gather(*(one(u) for u in urls))

        t0, c0 = time.monotonic(), time.process_time()
        got = asyncio.run(fetch_all())
        wall = time.monotonic() - t0
        print(f"network alone: {len(urls)} URLs in {wall:.1f} s ({len(urls) / wall:.0f} URLs/s), main-process CPU "
              f"{time.process_time() - c0:.1f} s, {sum(len(g.body or b'') for g in got) / 2**20:.0f} MiB")

        # 3. the stage by phase (no Dagster): ingest, download (+ staging writes), merge/gate/publish
        lake = Lake(out / "profile-lake")
        shutil.rmtree(lake.uri, ignore_errors=True)
        src = f"{args.corpus}/urls.parquet"
        t0 = time.monotonic()
        registry.register(lake, [src])
        key = shard_key(src)
        stages.run_raw_urls(lake, cfg, key)
        t_ingest = time.monotonic() - t0
        staged = {"s": 0.0, "n": 0}
        append = lake.append

        def timed_append(*a, **kw):
            t = time.monotonic()
            append(*a, **kw)
            staged["s"] += time.monotonic() - t
            staged["n"] += 1

        lake.append = timed_append
        rss_ingest = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        dl = {}
        orig_run = ShardDownloader.run

        def timed_run(self, *a, **kw):
            t = time.monotonic()
            c = time.process_time()
            p = orig_run(self, *a, **kw)
            dl.update(wall=time.monotonic() - t, cpu=time.process_time() - c,
                      rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            return p

        ShardDownloader.run = timed_run
        t0 = time.monotonic()
        stages.run_images(lake, cfg, key)
        t_images = time.monotonic() - t0
        ShardDownloader.run = orig_run
        print(f"stage phases: raw_urls (read, uid, gate, publish) {t_ingest:.1f} s; images {t_images:.1f} s = "
              f"download {dl['wall']:.1f} s (main-process CPU {dl['cpu']:.1f} s; staging writes {staged['s']:.1f} s "
              f"in {staged['n']} commits on the writer thread) + merge/gate/publish {t_images - dl['wall']:.1f} s")
        print(f"main-process peak RSS (MB): after raw_urls {rss_ingest:.0f}, after download {dl['rss']:.0f}, "
              f"after publish {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
        cli0 = time.monotonic()
        subprocess.run([PY, "-W", "ignore", "-c", "import laion_assets.defs.definitions"], check=True, capture_output=True)
        print(f"Dagster definitions import (CLI startup floor): {time.monotonic() - cli0:.1f} s")
        shutil.rmtree(lake.uri, ignore_errors=True)
    finally:
        if started:
            subprocess.run([str(BENCH / "serve.sh"), "stop"], check=False)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        export(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "profile"])
    ap.add_argument("--corpus", default=os.environ.get("BENCH_CORPUS", "/tmp/bench-corpus"))
    ap.add_argument("-n", "--n", type=int, default=5000, help="corpus size when it has to be generated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "bench-download"))
    ap.add_argument("--i2d-venv", default=os.environ.get("I2D_VENV", "/tmp/i2d-venv"))
    ap.add_argument("--threads", type=int, default=32, help="img2dataset threads per process")
    ap.add_argument("--procs", type=int, default=2, help="img2dataset processes")
    ap.add_argument("--sample", type=int, default=500, help="profile: images for the CPU breakdown")
    args = ap.parse_args()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    (profile if args.mode == "profile" else bench)(args)


if __name__ == "__main__":
    main()
