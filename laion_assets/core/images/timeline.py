"""The images stage's timeline for benchmarks/bench_download.py: with LAION_ASSETS_TIMELINE set
to a file, the download appends one JSON line a second (where the rows are, the CPU used) and
the stage one line per later phase. Off (the variable unset), nothing runs and nothing is timed
beyond the counters the download keeps anyway."""

from __future__ import annotations

import asyncio
import json
import os
import time

TIMELINE_ENV = "LAION_ASSETS_TIMELINE"


def note_timeline(**fields) -> None:
    """One line for the benchmark's timeline file, when there is one (a phase's duration)."""
    if path := os.environ.get(TIMELINE_ENV):
        with open(path, "a") as out:
            out.write(json.dumps(fields) + "\n")


async def sample_timeline(progress, cpu, path: str) -> None:
    """One JSON line a second to `path` (env LAION_ASSETS_TIMELINE, for the benchmark), and a
    last one when the download ends: where the rows are, and the CPU used (main process and
    decode workers together, 100 = one core) since the line before."""
    start_cpu = time.process_time()
    last = [time.monotonic(), start_cpu, 0.0]

    def sample(out) -> None:
        now, main_cpu, decode = time.monotonic(), time.process_time(), progress.seconds["decode"]
        cpu_pct = 100 * (main_cpu - last[1] + decode - last[2]) / max(1e-9, now - last[0])
        out.write(json.dumps({
            "t": round(progress.elapsed, 2), "in_flight": progress.in_flight,
            "waiting_decode": progress.at_cpu - cpu.busy, "decoding": cpu.busy, "done": progress.done,
            "staged": progress.staged, "cpu_pct": round(cpu_pct), "main_cpu_s": round(main_cpu - start_cpu, 2),
            **{f"{k}_s": round(v, 2) for k, v in sorted(progress.seconds.items())},
        }) + "\n")
        out.flush()
        last[:] = now, main_cpu, decode

    with open(path, "a") as out:
        try:
            while True:
                await asyncio.sleep(1.0)
                sample(out)
        finally:
            sample(out)
