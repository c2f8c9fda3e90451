"""Many shard runs at once through a real `dagster-daemon` on Postgres: a backfill queued by
`laion-assets backfill`, drained by the run queue (4 runs in flight) within the `download` and
`gpu` pool limits; then the same with run workers killed (SIGKILL) at random and retried by the
daemon. Every table must hold every shard's rows exactly once and every gate must have run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from laion_assets_tests.conftest import asset_key
from laion_assets_tests.deployment import (
    BIN,
    STAGES,
    Daemon,
    RunLogs,
    assert_every_gate_passed,
    assert_every_shard_once,
    dagster_home,
    max_overlap,
    pipeline_env,
    shard_of,
    write_shards,
)

pytestmark = pytest.mark.slow

SHARDS, ROWS, RUNS_IN_FLIGHT, KILLS = 8, 5, 4, 3  # two waves of 4 runs: every kill lands before the queue drains
POOLS = {"download": 2, "gpu": 1}
OVERRIDES = {
    "concurrency": {"runs": {"max_concurrent_runs": RUNS_IN_FLIGHT}},
    "run_coordinator": {"config": {"dequeue_interval_seconds": 1}},
    "run_monitoring": {"poll_interval_seconds": 2, "free_slots_after_run_end_seconds": 2},
    # No asset daemon: stage_automation would start runs of its own for shards whose backfill
    # run was killed (racing the retry). This test is about backfills; the shard_files sensor
    # runs (over an empty folder).
    "auto_materialize": {"enabled": False, "use_sensors": False},
}


@pytest.fixture
def deployment(tmp_path, postgres, site, server):
    db = postgres.create_database(f"daemon_{os.getpid()}_{tmp_path.name[-12:]}".replace("-", "_").lower())
    home = dagster_home(tmp_path, OVERRIDES)
    env = pipeline_env(tmp_path, home, postgres.env(db), executor="in_process")
    os.environ.update({k: env[k] for k in postgres.env(db)})  # this process reads the same instance
    instance = DagsterInstance.from_config(str(home))
    for pool, limit in POOLS.items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)
    yield {"tmp": tmp_path, "env": env, "instance": instance, "site": site, "server": server}
    instance.dispose()


def backfill(d: dict, prefix: str) -> tuple[list[str], str]:
    """Write the shards and queue them with the project's CLI; returns shard keys, backfill id."""
    files = write_shards(d["tmp"] / prefix, d["site"][1], d["server"].base_url, SHARDS, ROWS, prefix)
    out = subprocess.run(
        [str(BIN / "laion-assets"), "backfill", str(d["tmp"] / prefix)], env=d["env"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    backfill_id = out.stdout.split()[1].rstrip(":")
    assert f"{SHARDS} shards queued" in out.stdout
    return [f.name.split(".")[0] for f in files], backfill_id


def wait_done(instance: DagsterInstance, backfill_id: str, shards: list[str], timeout: float, on_tick=None) -> list:
    """Until no run of the backfill is queued, running or waiting for its retry; returns the
    backfill's run records (retries carry the backfill's tag)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = instance.get_run_records(RunsFilter(tags={"dagster/backfill": backfill_id}))
        retried = {r.dagster_run.parent_run_id for r in records}
        busy = [
            r for r in records
            if not r.dagster_run.is_finished
            or (r.dagster_run.tags.get("dagster/will_retry") == "true" and r.dagster_run.run_id not in retried)
        ]
        launched = {shard_of(r.dagster_run) for r in records}
        if launched >= set(shards) and not busy:
            return records
        if on_tick:
            on_tick(records)
        time.sleep(1)
    statuses = sorted(r.dagster_run.status.value for r in records)
    missing = {s: sorted(set(shards) - instance.get_materialized_partitions(asset_key(s)))[:5] for s in STAGES}
    raise TimeoutError(f"backfill {backfill_id} not done after {timeout} s: runs {statuses}, not materialized {missing}")


def run_worker_pid(instance: DagsterInstance, run_id: str) -> int | None:
    for rec in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        pid = rec.dagster_event.event_specific_data.metadata.get("pid")
        if pid is not None:
            return int(pid.value)
    return None


class Killer:
    """Kills the run worker (SIGKILL) of a random run in the middle of a step, at random moments,
    `wanted` times, each time in a step it has not killed yet."""

    def __init__(self, instance: DagsterInstance, wanted: int, seed: int = 14):
        self.instance, self.wanted, self.rng = instance, wanted, random.Random(seed)
        self.killed: dict[str, str] = {}  # run id -> the step it was in
        self.next_at = time.monotonic() + self.rng.uniform(5, 12)

    def __call__(self, records) -> None:
        if len(self.killed) >= self.wanted or time.monotonic() < self.next_at:
            return
        running = [r.dagster_run.run_id for r in records if r.dagster_run.status == DagsterRunStatus.STARTED]
        for run_id in self.rng.sample(running, len(running)):
            pid = run_worker_pid(self.instance, run_id)
            logs = self.instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS})
            steps = [e.dagster_event.step_key for e in logs if e.dagster_event.event_type == DagsterEventType.STEP_START]
            done = {e.dagster_event.step_key for e in logs if e.dagster_event.event_type == DagsterEventType.STEP_SUCCESS}
            mid_step = steps and steps[-1] not in done and steps[-1] not in self.killed.values()
            if pid and mid_step and run_id not in self.killed:
                os.kill(pid, signal.SIGKILL)
                self.killed[run_id] = steps[-1]
                self.next_at = time.monotonic() + self.rng.uniform(2, 8)
                return


@pytest.mark.timeout(900)  # ~3 minutes on an idle 2-core box; much more when it is shared
def test_backfill_of_8_shards_with_run_workers_killed_at_random(deployment):
    """8 shards, 4 runs in flight, pools `download`=2 and `gpu`=1; 3 run workers killed with
    SIGKILL in the middle of a step at random moments. The runs not killed succeed at once; each killed run is marked
    failed (its code server sees the process gone) and retried by the daemon from the step that
    died; at the end every shard's rows are in every table once and every gate passed."""
    d = deployment
    shards, backfill_id = backfill(d, "shard")
    killer = Killer(d["instance"], wanted=KILLS)
    daemon = Daemon(d["env"], d["tmp"] / "daemon.log")
    try:
        started = time.monotonic()
        records = wait_done(d["instance"], backfill_id, shards, timeout=780, on_tick=killer)
        elapsed = time.monotonic() - started
    finally:
        daemon.stop()
    runs = {r.dagster_run.run_id: r.dagster_run for r in records}
    assert len(killer.killed) == killer.wanted, killer.killed
    first_tries = [r for r in runs.values() if r.parent_run_id is None]
    assert len(first_tries) == SHARDS  # one run per shard, then retries
    for run in runs.values():
        if run.run_id in killer.killed:
            assert run.status == DagsterRunStatus.FAILURE
        elif run.tags.get("dagster/will_retry") != "true":
            assert run.status == DagsterRunStatus.SUCCESS, (run.run_id, run.status)
    retries = [r for r in runs.values() if r.parent_run_id in killer.killed]
    assert {r.parent_run_id for r in retries} == set(killer.killed)
    for retry in retries:  # from the step that died: the steps done before it are not redone
        killed_in = killer.killed[retry.parent_run_id]
        finished = {e.dagster_event.step_key for e in d["instance"].all_logs(retry.parent_run_id, of_type=DagsterEventType.STEP_SUCCESS)}
        redone = [e.dagster_event.step_key for e in d["instance"].all_logs(retry.run_id, of_type=DagsterEventType.STEP_START)]
        assert redone and not finished & set(redone), (finished, redone)
        # the step the kill was aimed at comes first, unless it finished in the moment before the kill
        assert redone[0] == killed_in or killed_in in finished, (killed_in, finished, redone)

    logs = RunLogs(d["instance"], list(runs))
    assert_every_gate_passed(logs, shards)
    counts = assert_every_shard_once(d["env"]["LAION_ASSETS_LAKE"], shards, ROWS)
    runs_peak = max_overlap([(r.start_time, r.end_time) for r in records if r.start_time and r.end_time])
    assert runs_peak == RUNS_IN_FLIGHT, f"{runs_peak} runs in flight (limit {RUNS_IN_FLIGHT})"
    assert logs.pool_peak(["images"]) <= POOLS["download"]
    assert logs.pool_peak(["embeddings"]) <= POOLS["gpu"]
    print(f"\n{SHARDS} shards, {len(runs)} runs in {elapsed:.0f} s; {runs_peak} runs in flight; pools peaked at "
          f"download={logs.pool_peak(['images'])} gpu={logs.pool_peak(['embeddings'])}; killed in {sorted(killer.killed.values())}; "
          f"rows {counts}")
