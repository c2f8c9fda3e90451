"""Runs that die never block others, and waiting for a pool slot costs no CPU and stops on
SIGTERM: real processes executing real Dagster runs against one sqlite instance, killed with
SIGKILL the way an OOM kill ends them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import psutil
import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, build_sensor_context
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster_graphql.test.utils import execute_dagster_graphql

from laion_assets.core.images.config import DownloadConfig
from laion_assets.defs.recovery import dead_runs, recover_dead_runs
from laion_assets_tests.conftest import REPO, make_config, write_config

HOLDER = textwrap.dedent(
    """
    import sys, time, uuid
    from dagster import DagsterInstance, job, op
    from laion_assets.defs.recovery import fix_slot_wait, process_tags
    fix_slot_wait()

    @op(pool="download")
    def hold():
        print("HOLDING", flush=True)
        time.sleep(120)

    @job
    def holder():
        hold()

    run_id = str(uuid.uuid4())
    result = holder.execute_in_process(instance=DagsterInstance.get(), raise_on_error=False, run_id=run_id,
                                       tags=process_tags(run_id) if sys.argv[1] == "tagged" else {})
    print("ENDED", result.dagster_run.status.value, flush=True)
    """
)


def write_instance(home: Path) -> Path:
    """A DAGSTER_HOME like the repo's: sqlite storage and pools of one slot."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(textwrap.dedent(f"""
        storage:
          sqlite:
            base_dir: {home}/storage
        telemetry:
          enabled: false
        concurrency:
          pools:
            default_limit: 1
        """))
    return home


def cli_env(home: Path, **extra) -> dict:
    return {**os.environ, "DAGSTER_HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true", "GX_ANALYTICS_ENABLED": "False", **extra}


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def download_pool(instance: DagsterInstance):
    return instance.event_log_storage.get_concurrency_info("download")


@pytest.fixture
def home(tmp_path):
    return write_instance(tmp_path / "home")


def start_holder(tmp_path: Path, home: Path, tagged: bool, name: str) -> subprocess.Popen:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, str(script), "tagged" if tagged else "plain"], env=cli_env(home), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def log_of(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text()


@pytest.mark.slow
def test_killed_runs_free_their_slots_and_waiting_costs_no_cpu(tmp_path, home):
    with DagsterInstance.from_config(str(home)) as instance:
        holder = start_holder(tmp_path, home, tagged=True, name="holder")
        waiter = None
        try:
            wait_for(lambda: "HOLDING" in log_of(tmp_path, "holder"), 90, "the holder's slot")

            # a second run waits for the slot: asleep, not spinning
            waiter = start_holder(tmp_path, home, tagged=False, name="waiter")
            wait_for(lambda: download_pool(instance).pending_step_count == 1, 90, "the waiter's pending claim")
            time.sleep(1.0)
            proc = psutil.Process(waiter.pid)
            before = sum(proc.cpu_times()[:2])
            time.sleep(4.0)
            spent = sum(proc.cpu_times()[:2]) - before
            assert spent < 0.4, f"a run waiting for a slot used {spent:.2f} s of CPU in 4 s"

            # SIGTERM while waiting: the run ends within seconds, failed, its claim withdrawn
            sent = time.monotonic()
            waiter.send_signal(signal.SIGTERM)
            waiter.wait(15)
            assert time.monotonic() - sent < 5, "SIGTERM took more than 5 s to stop a waiting run"
            assert "ENDED FAILURE" in log_of(tmp_path, "waiter")
            assert download_pool(instance).pending_step_count == 0

            # the holder is killed (an OOM kill): its slot stays claimed, its run STARTED
            stuck = start_holder(tmp_path, home, tagged=False, name="stuck")
            wait_for(lambda: download_pool(instance).pending_step_count == 1, 90, "a new waiter")
            holder.kill()
            holder.wait()
            time.sleep(3)
            assert "HOLDING" not in log_of(tmp_path, "stuck"), "the dead run's slot was given away by itself"
            [held] = download_pool(instance).claimed_slots
            dead_run = instance.get_run_by_id(held.run_id)
            assert dead_run.status == DagsterRunStatus.STARTED

            notes = recover_dead_runs(instance)
            assert any("died: marked failed, its pool slots freed" in n for n in notes), notes
            assert instance.get_run_by_id(dead_run.run_id).status == DagsterRunStatus.FAILURE
            wait_for(lambda: "HOLDING" in log_of(tmp_path, "stuck"), 30, "the waiter to get the freed slot")

            # a run without our tags (as the daemon launches them) is found by the pid Dagster logs
            stuck.kill()
            stuck.wait()
            [held] = download_pool(instance).claimed_slots
            with build_sensor_context(instance=instance) as ctx:
                dead_runs(ctx)
            assert instance.get_run_by_id(held.run_id).status == DagsterRunStatus.FAILURE
            assert download_pool(instance).claimed_slots == []
            assert recover_dead_runs(instance) == []  # nothing left to do
        finally:
            for p in (holder, waiter):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()


def test_live_runs_and_other_machines_are_left_alone(tmp_path, home):
    """A run whose process lives, or one that another machine executes, is never touched."""
    with DagsterInstance.from_config(str(home)) as instance:
        holder = start_holder(tmp_path, home, tagged=True, name="holder")
        try:
            wait_for(lambda: "HOLDING" in log_of(tmp_path, "holder"), 90, "the holder's slot")
            [held] = download_pool(instance).claimed_slots
            assert recover_dead_runs(instance) == []
            run = instance.get_run_by_id(held.run_id)
            instance.add_run_tags(run.run_id, {"laion_assets/host": "another-machine", "laion_assets/pid": "1"})
            holder.kill()
            holder.wait()
            assert recover_dead_runs(instance) == []  # not this machine's to judge
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()


REEXECUTE = """mutation($parent: String!) {
  launchPipelineReexecution(reexecutionParams: {parentRunId: $parent, strategy: ALL_STEPS}) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message stack }
  }
}"""
SLOW_MS = 6000  # how long the test site takes to answer each image request


def step_ended(instance: DagsterInstance, run_id: str, step: str) -> bool | None:
    """None before `step` started, False while it runs, True once it ended."""
    ends = (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE)
    events = [e.dagster_event.event_type for e in instance.all_logs(run_id) if e.dagster_event and e.step_key == step]
    if DagsterEventType.STEP_START not in events:
        return None
    return any(e in ends for e in events)


@pytest.mark.slow
def test_a_reexecuted_cli_run_is_never_judged_by_its_parents_process(tmp_path, home, testsite, monkeypatch):
    """A `laion-assets run` killed in `images` is recovered by its own pid tags. Re-executed the
    way the UI does it (the GraphQL mutation: the parent's tags, dead pid included, copied onto
    a run that the code server's run worker executes), the new run is never marked failed and
    holds its `download` slot until its step ends, while `dead_runs` keeps looking."""
    _, base = testsite
    shard = tmp_path / "input" / "slow.parquet"
    shard.parent.mkdir()
    urls = [f"{base}/sleep/{SLOW_MS}/reexecuted-{i}/p1.jpg" for i in range(2)]
    pl.DataFrame({"URL": urls, "TEXT": ["a blue picture", "another blue picture"]}).write_parquet(shard)
    download = DownloadConfig(allowed_networks=("127.0.0.1/32",), retries=0, read_timeout_s=60, total_timeout_s=60)
    env = {
        "LAION_ASSETS_LAKE": str(tmp_path / "lake"), "LAION_ASSETS_INPUT": str(shard.parent), "LAION_ASSETS_DECODE": "thread",
        "LAION_ASSETS_CONFIG": str(write_config(tmp_path / "pipeline.yaml", make_config(download=download, subsets=()))),
    }
    with (home / "dagster.yaml").open("a") as f:  # no daemon here to dequeue runs: the UI's launches start at once
        f.write("run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n")

    with DagsterInstance.from_config(str(home)) as instance:
        with open(tmp_path / "cli.log", "w") as log:
            cli = subprocess.Popen([str(Path(sys.executable).parent / "laion-assets"), "run", str(shard), "--select", "raw_urls,images"],
                                   env=cli_env(home, **env), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for(lambda: download_pool(instance).claimed_slots, 180, "the CLI run's download slot")
            finally:
                cli.kill()
                cli.wait()
        [held] = download_pool(instance).claimed_slots
        parent = instance.get_run_by_id(held.run_id)
        assert parent.tags["laion_assets/run"] == parent.run_id

        # the CLI died: its run is judged by its own tags
        notes = recover_dead_runs(instance)
        assert any(f"pid {cli.pid}) died" in n for n in notes), notes
        assert instance.get_run_by_id(parent.run_id).status == DagsterRunStatus.FAILURE
        assert download_pool(instance).claimed_slots == []

        # "Re-execute all" in the UI
        for key, value in {**env, "DAGSTER_HOME": str(home)}.items():
            monkeypatch.setenv(key, value)
        with WorkspaceProcessContext(instance, WorkspaceFileTarget([str(REPO / "workspace.yaml")])) as workspace:
            launched = execute_dagster_graphql(workspace.create_request_context(), REEXECUTE, {"parent": parent.run_id})
            reply = launched.data["launchPipelineReexecution"]
            assert reply["__typename"] == "LaunchRunSuccess", reply
            run_id = reply["run"]["runId"]
            tags = instance.get_run_by_id(run_id).tags
            assert tags["laion_assets/pid"] == str(cli.pid) and tags["dagster/parent_run_id"] == parent.run_id

            checks_mid_step = 0
            deadline = time.monotonic() + 240
            while not instance.get_run_by_id(run_id).is_finished:
                assert time.monotonic() < deadline, "the re-executed run did not finish"
                assert recover_dead_runs(instance) == []
                with build_sensor_context(instance=instance) as ctx:
                    dead_runs(ctx)
                # the step claims its slot before it starts and frees it after it ends
                started = step_ended(instance, run_id, "images") is False
                holders = [s.run_id for s in download_pool(instance).claimed_slots]
                if started and step_ended(instance, run_id, "images") is False:
                    assert holders == [run_id]
                    checks_mid_step += 1
                time.sleep(0.2)

        run = instance.get_run_by_id(run_id)
        assert run.status == DagsterRunStatus.SUCCESS, [e.message for e in instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)]
        assert instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE) == []
        assert checks_mid_step >= 3, f"only {checks_mid_step} checks while `images` ran"
        assert download_pool(instance).claimed_slots == []
