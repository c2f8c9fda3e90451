"""Runs that die (kill -9, out of memory, a lost machine) never block others.

Dagster frees a step's concurrency-pool slot (`download`, `gpu`) when the step ends; a process
killed mid-step never gets there, so the slot stays claimed and its run stays STARTED, and every
later run of that stage waits forever. Run monitoring in the daemon frees the slots of runs that
ended (`free_slots_after_run_end_seconds` in dagster.yaml), but it cannot tell that the run
worker of the default run launcher is gone. So `recover_dead_runs` marks runs whose process is
gone as failed and frees their slots: the CLI calls it when it starts, and the `dead_runs`
sensor calls it where a daemon runs. A run is judged by the pid tags only when they name that
very run: a re-execution (from the UI, by run_retries) copies its parent's tags, pid included,
while another process executes it.

Waiting for a slot: Dagster 1.13's in-process loop computes its nap as `min(0, time to the next
claim check)`, which is never positive, and the multiprocess loop has no nap at all, so a run
waiting for a slot spins at 100% CPU and never looks at Ctrl-C. `fix_slot_wait` makes the
wait sleep until the next claim check, in short naps that end the run on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, DefaultSensorStatus, RunsFilter, SkipReason, sensor
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.execution.plan.active import ActiveExecution
from dagster._utils.interrupts import check_captured_interrupt

HOST_TAG, PID_TAG, STARTED_TAG = "laion_assets/host", "laion_assets/pid", "laion_assets/process_started"
RUN_TAG = "laion_assets/run"  # the run the process tags were written for
ACTIVE = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
NAP_S = 0.2  # how soon a run waiting for a slot notices Ctrl-C


def process_tags(run_id: str) -> dict[str, str]:
    """Tags naming this process as the one executing run `run_id` (the CLI's own runs): host,
    pid, start time, and the run id, which a re-execution's copy of them does not match."""
    me = psutil.Process()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(me.pid), STARTED_TAG: f"{me.create_time():.3f}", RUN_TAG: run_id}


def recover_dead_runs(instance: DagsterInstance) -> list[str]:
    """Mark failed the unfinished runs whose process is gone and free their pool slots, then
    free the slots still held by finished or deleted runs. Returns one line per run."""
    notes = []
    for rec in instance.get_run_records(RunsFilter(statuses=ACTIVE)):
        owner = _owner(instance, rec)
        if owner is None or not _gone(*owner, rec.start_time):
            continue
        run = rec.dagster_run
        instance.report_run_failed(
            run, f"Its process (pid {owner[0]}) is gone (killed, out of memory or a lost machine): "
            "marked failed by laion-assets, its pool slots freed. Rerun to resume.",
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        notes.append(f"run {run.run_id[:8]} ({run.job_name}, pid {owner[0]}) died: marked failed, its pool slots freed")
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in storage.get_concurrency_run_ids():
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
                notes.append(f"run {run_id[:8]} ({'deleted' if run is None else run.status.value.lower()}) still held pool slots: freed")
    return notes


def _owner(instance: DagsterInstance, rec) -> tuple[int, float | None] | None:
    """The process executing a run on this machine (pid, its start time when recorded), or None
    when that cannot be told: a run of another machine is left to the daemon's run monitoring.
    Pid tags copied from another run (a re-execution's parent) say nothing about this one."""
    tags = rec.dagster_run.tags
    if tags.get(RUN_TAG) == rec.dagster_run.run_id:
        if tags.get(HOST_TAG) != socket.gethostname():
            return None
        return int(tags[PID_TAG]), float(tags[STARTED_TAG])
    if "sqlite" not in type(instance.run_storage).__name__.lower():
        return None  # a shared instance (Postgres): its runs may live on other machines
    for entry in instance.all_logs(rec.dagster_run.run_id, of_type=DagsterEventType.ENGINE_EVENT):
        pid = entry.dagster_event.engine_event_data.metadata.get("pid")  # "Executing steps ... (pid: N)"
        if pid is not None:
            return int(pid.value), None
    return None


def _gone(pid: int, started: float | None, run_started: float | None) -> bool:
    """True when no process `pid` runs any more (a zombie counts as gone), or the pid now
    belongs to a newer process."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return True
    if started is not None:
        return abs(created - started) > 1
    return run_started is not None and created > run_started + 1


@sensor(
    minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
    description="Marks failed the runs whose process died (kill -9, out of memory) and frees their concurrency-pool slots.",
)
def dead_runs(context):
    notes = recover_dead_runs(context.instance)
    for note in notes:
        context.log.warning(note)
    return SkipReason("; ".join(notes) or "no dead runs")


# -- waiting for a pool slot ----------------------------------------------------------------

_blocking_events = ActiveExecution.concurrency_event_iterator


def _concurrency_event_iterator(self, plan_context):
    """Dagster's blocked-step events, then, when nothing runs and a step waits for a pool slot,
    a sleep until its next claim check (Dagster's back-off, 1 to 15 s)."""
    yield from _blocking_events(self, plan_context)
    ctx = self._instance_concurrency_context
    if self._in_flight or ctx is None or not ctx.has_pending_claims():
        return
    checks = [*ctx._pending_timeouts.values(), *self._waiting_to_retry.values()]
    deadline = time.monotonic() + max(0.0, min(checks) - time.time()) if checks else 0.0
    while True:
        if check_captured_interrupt():
            raise DagsterExecutionInterruptedError("interrupted while waiting for a concurrency-pool slot")
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, NAP_S))


def fix_slot_wait() -> None:
    """Install the sleeping wait (idempotent): the CLI and the code location both call it, so
    it holds in the CLI's runs and in run workers started by the daemon."""
    ActiveExecution.concurrency_event_iterator = _concurrency_event_iterator


# -- the CLI's signals ----------------------------------------------------------------------

class Interrupts:
    """Sees a SIGINT or SIGTERM even while Dagster's own handler holds it back (it only sets a
    flag that it clears when a run ends): the signal module writes every signal's number to a
    wakeup pipe, whoever handles it. Outside runs, SIGTERM is made a KeyboardInterrupt."""

    def __enter__(self) -> Interrupts:
        self.read, write = os.pipe()
        os.set_blocking(self.read, False)
        os.set_blocking(write, False)
        self.write = write
        self.previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self.previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
        return self

    def seen(self) -> bool:
        try:
            data = os.read(self.read, 1024)
        except BlockingIOError:
            return False
        return any(n in (signal.SIGINT, signal.SIGTERM) for n in data)

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self.previous_fd)
        signal.signal(signal.SIGTERM, self.previous_term)
        os.close(self.read)
        os.close(self.write)
