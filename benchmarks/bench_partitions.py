"""Partitions at LAION scale: LAION-5B is ~58,000 shards of 100,000 rows, one partition each.

On a Postgres instance (deploy/postgres/dagster.yaml, PostgreSQL from the system packages on
127.0.0.1) with a real `dagster-daemon`, this measures:

  sensor     `shard_files` sees N new shard files: registers them in the lake and as partitions
             and hands them to the daemon as one backfill (its tick, from the tick records);
  runs       the backfill daemon turning that backfill into queued runs, watched for --observe
             seconds (runs/s), then stopped (the queue is paused: max_concurrent_runs 0,
             nothing executes);
  ui         the partitions page of `raw_urls` in dagster-webserver, loaded in headless chromium
             (Playwright, /usr/bin/chromium) until the partition count is on screen (--ui);
  backfill   a backfill of B shards launched as the UI does (GraphQL launchPartitionBackfill),
             then the backfill daemon's iteration that turns it into B queued runs.

  python benchmarks/bench_partitions.py --shards 60000 --backfill 1000 --ui
  python benchmarks/bench_partitions.py --shards 2000 --backfill 100          # quick look

Prints the figures and a JSON line; the shard files are empty (the sensor only lists names).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from laion_assets_tests.deployment import BIN, Daemon, dagster_home, pipeline_env  # noqa: E402
from laion_assets_tests.servers import PostgresServer, free_port, wait_for  # noqa: E402

OVERRIDES = {
    "concurrency": {"runs": {"max_concurrent_runs": 0}},  # measure launching, run nothing
    "auto_materialize": {"enabled": False},  # stage_automation has nothing to do before raw_urls runs
}


def make_shard_files(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"part-{i:06d}.parquet").touch()


def sensor_ticks(instance, name: str) -> list:
    from dagster._core.scheduler.instigation import InstigatorType

    states = [s for s in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR) if s.name == name]
    return [t for s in states for t in instance.get_ticks(s.instigator_origin_id, s.selector_id)]


def wait_sensor(instance, n: int, timeout: float) -> dict:
    """Until the shard_files sensor has finished a tick that registered `n` partitions."""
    from dagster._core.scheduler.instigation import TickStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [t for t in sensor_ticks(instance, "shard_files") if t.status in (TickStatus.SUCCESS, TickStatus.FAILURE)]
        busy = [t for t in done if t.tick_data.end_timestamp and (t.tick_data.run_ids or t.tick_data.dynamic_partitions_request_results)]
        if busy:
            tick = busy[-1].tick_data
            if tick.status == TickStatus.FAILURE:
                raise RuntimeError(f"sensor tick failed: {tick.error}")
            return {"tick_s": round(tick.end_timestamp - tick.timestamp, 2), "requests_from_tick": len(tick.run_ids or [])}
        time.sleep(1)
    raise TimeoutError(f"no sensor tick registered {n} shards in {timeout} s")


def count_runs(instance) -> int:
    return instance.get_runs_count()


def observe_sensor_backfill(instance, seconds: float) -> dict:
    """Runs/s the backfill daemon creates for the sensor's backfill, then that backfill is
    marked canceled (the runs already queued stay, as they would in a real deployment)."""
    from dagster._core.execution.backfill import BulkActionStatus

    deadline = time.monotonic() + 120
    while not (backfills := [b for b in instance.get_backfills() if b.tags.get("laion_assets/launched_by") == "shard_files"]):
        if time.monotonic() > deadline:
            raise TimeoutError("the sensor launched no backfill")
        time.sleep(0.5)
    first_seen = time.monotonic()
    while count_runs(instance) == 0 and time.monotonic() - first_seen < 120:
        time.sleep(0.2)
    start, runs0 = time.monotonic(), count_runs(instance)
    time.sleep(seconds)
    created = count_runs(instance) - runs0
    rate = created / (time.monotonic() - start)
    instance.update_backfill(instance.get_backfill(backfills[0].backfill_id).with_status(BulkActionStatus.CANCELED))
    return {"backfill_wait_s": round(start - first_seen, 1), "sensor_backfill_runs_per_s": round(rate, 2),
            "runs_queued_before_ui": count_runs(instance)}


def ui_partitions_page(port: int, expected: int, timeout_s: float = 300) -> dict:
    """Seconds until the raw_urls partitions page shows the partition count (cold, then warm)."""
    from playwright.sync_api import sync_playwright

    shown = f"{expected:,}"
    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        for attempt in ("cold", "warm"):
            start = time.monotonic()
            page.goto(f"http://127.0.0.1:{port}/assets/raw_urls?view=partitions", timeout=timeout_s * 1000)
            page.get_by_text(shown, exact=False).first.wait_for(timeout=timeout_s * 1000)
            out[f"ui_partitions_page_{attempt}_s"] = round(time.monotonic() - start, 2)
        browser.close()
    return out


def graphql(port: int, query: str, variables: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


LAUNCH = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""


def launch_backfill(port: int, keys: list[str]) -> dict:
    start = time.monotonic()
    res = graphql(port, LAUNCH, {"params": {"partitionNames": keys, "assetSelection": [{"path": ["raw_urls"]}]}})
    result = res["data"]["launchPartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        raise RuntimeError(f"backfill launch failed: {result}")
    return {"backfill_id": result["backfillId"], "backfill_launch_s": round(time.monotonic() - start, 2)}


def wait_runs(instance, n: int, timeout: float) -> float:
    start = time.monotonic()
    while count_runs(instance) < n:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{count_runs(instance)} of {n} runs after {timeout} s")
        time.sleep(0.5)
    return round(time.monotonic() - start, 2)


def run(shards: int, backfill: int, ui: bool, root: Path, observe: float = 60, timeout: float = 3600) -> dict:
    from dagster import DagsterInstance

    figures: dict = {"shards": shards, "backfill": backfill}
    pg = PostgresServer().start()
    daemon = web = None
    try:
        db = pg.create_database("bench_partitions")
        home = dagster_home(root, OVERRIDES)
        env = pipeline_env(root, home, pg.env(db))
        make_shard_files(Path(env["LAION_ASSETS_INPUT"]), shards)
        os.environ.update(pg.env(db))
        instance = DagsterInstance.from_config(str(home))

        start = time.monotonic()
        daemon = Daemon(env, root / "daemon.log")
        figures.update(wait_sensor(instance, shards, timeout))
        figures["sensor_total_s"] = round(time.monotonic() - start, 2)  # incl. daemon start
        figures["partitions"] = len(instance.get_dynamic_partitions("shards"))
        figures["runs_from_sensor_tick"] = count_runs(instance)
        if shards > 100:  # bulk drops become one backfill (defs/sensors.py)
            figures.update(observe_sensor_backfill(instance, observe))

        port = free_port()
        if ui or backfill:
            import subprocess

            web = subprocess.Popen(
                [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO / "workspace.yaml")],
                env=env, stdout=open(root / "webserver.log", "wb"), stderr=subprocess.STDOUT,
            )
            wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2), "webserver", timeout=180, proc=web)
        if ui:
            figures.update(ui_partitions_page(port, shards))
        if backfill:
            before = count_runs(instance)
            keys = [f"part-{i:06d}" for i in range(backfill)]
            figures.update(launch_backfill(port, keys))
            figures["backfill_runs_queued_s"] = wait_runs(instance, before + backfill, timeout)
        instance.dispose()
    finally:
        for proc in (web,):
            if proc and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        if daemon:
            daemon.stop()
        pg.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=60000)
    parser.add_argument("--backfill", type=int, default=1000)
    parser.add_argument("--ui", action="store_true", help="measure the partitions page in chromium")
    parser.add_argument("--observe", type=float, default=60, help="seconds to watch the sensor's backfill create runs")
    parser.add_argument("--dir", default="/tmp/bench-partitions")
    args = parser.parse_args()
    root = Path(args.dir)
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    figures = run(args.shards, args.backfill, args.ui, root, args.observe)
    for k, v in figures.items():
        print(f"  {k:<32} {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
