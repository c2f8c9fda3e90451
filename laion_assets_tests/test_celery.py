"""A distributed engine for real: the Celery executor (dagster-celery) with a Redis broker and
two workers, each in its own network namespace (a separate host that reaches Postgres and
Redis through a forwarder, see netns.py). Four shard runs share the workers; one worker is
killed (SIGKILL) in the middle of a step, and the step is taken over by the other worker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from datetime import datetime

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance

from laion_assets.core.lake.delta import Lake
from laion_assets.defs.backfills import register_shards
from laion_assets_tests import netns
from laion_assets_tests.conftest import REPO
from laion_assets_tests.deployment import (
    BIN,
    SELECT,
    RunLogs,
    assert_every_gate_passed,
    assert_every_shard_once,
    dagster_home,
    deep_merge,
    max_overlap,
    pipeline_env,
    write_shards,
)
from laion_assets_tests.faultsite import FaultServer

pytestmark = pytest.mark.slow

SHARDS, ROWS = 4, 5
VISIBILITY_S = 30  # a task held by a dead worker goes back to the queue after this long (> any step here)
IMAGE_DELAY_MS = 3000  # every image is answered this late: the images step outlasts the kill's polling
KILLED_STEP = "images"


def celery_config(path, redis) -> str:
    cfg = yaml.safe_load((REPO / "deploy/celery/celery.yaml").read_text())
    cfg = deep_merge(cfg, {"execution": {"config": {
        # workers import the heavy modules before taking tasks, so a step stays well inside
        # the visibility timeout
        "include": ["laion_assets.defs.definitions", "laion_assets.core.embeddings.clip", "great_expectations"],
        "config_source": {"broker_transport_options": {"visibility_timeout": VISIBILITY_S, "unacked_restore_interval": 1}},
    }}})
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


class Workers:
    """`dagster-celery` workers, each on its own host (network namespace) when possible."""

    def __init__(self, env: dict, tmp, postgres, redis, site, port: int, names=("w1", "w2")):
        self.why_not_hosts = netns.unavailable()
        self.hosts, self.procs, self.logs = [], {}, {}
        try:
            self._start(env, tmp, postgres, redis, site, port, names)
        except BaseException:
            self.close()
            raise

    def _start(self, env, tmp, postgres, redis, site, port, names) -> None:
        for name in names:
            self.logs[name] = tmp / f"{name}.log"
            args = [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-y", env["LAION_ASSETS_CELERY_CONFIG"],
                    "--name", name, "--", "--pool=solo", "--without-gossip", "--without-mingle"]
            out = open(self.logs[name], "wb")
            if self.why_not_hosts:
                self.procs[name] = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                continue
            host = netns.Host(name)
            self.hosts.append(host)
            host.start([str(BIN / "python"), "-m", "laion_assets_tests.netns",
                        "--forward", f"{postgres.port}={postgres.socket_dir}/.s.PGSQL.{postgres.port}",
                        "--forward", f"{redis.port}={redis.socket}", "--site", str(site), "--port", str(port)],
                       env=env, stdout=subprocess.DEVNULL, stderr=out)
            self.procs[name] = host.start(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not all(b" ready." in log.read_bytes() for log in self.logs.values()):
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            assert not dead and time.monotonic() < deadline, {n: log.read_bytes()[-2000:] for n, log in self.logs.items()}
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for host in self.hosts:
            host.close()


def worker_of_steps(instance: DagsterInstance, run_id: str) -> list[tuple[str, str]]:
    """(step, worker) for every step a worker began, in order."""
    out = []
    for rec in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        meta = rec.dagster_event.event_specific_data.metadata
        if "Celery worker" in meta:
            out.append((rec.dagster_event.step_key, meta["Celery worker"].value.split("@")[0]))
    return out


def step_in_flight(instance: DagsterInstance, run_id: str, step: str) -> bool:
    ended = instance.all_logs(run_id, of_type={DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE})
    return all(rec.dagster_event.step_key != step for rec in ended)


def task_spans(log) -> list[tuple[float, float]]:
    """(received, finished) of each task a worker finished, from its log."""
    stamp = lambda line: datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    received, spans = {}, []
    for line in log.read_text(errors="replace").splitlines():
        if m := re.search(r"Task execute_plan\[([0-9a-f-]+)\] (received|succeeded)", line):
            if m[2] == "received":
                received[m[1]] = stamp(line)
            elif m[1] in received:
                spans.append((received.pop(m[1]), stamp(line)))
    return spans


@pytest.fixture
def web(site):
    """The site's images behind faultsite's routes (`/sleep/` answers late), as each worker host
    serves them in its namespace."""
    server = FaultServer(site[0])
    yield server
    server.close()


def test_celery_workers_on_two_hosts_run_shard_steps_and_take_over_a_killed_step(tmp_path, postgres, redis, site, web):
    db = postgres.create_database(f"celery_{os.getpid()}")
    home = dagster_home(tmp_path)
    env = pipeline_env(
        tmp_path, home, postgres.env(db), executor="celery",
        LAION_ASSETS_CELERY_CONFIG=celery_config(tmp_path / "celery.yaml", redis),
        DAGSTER_CELERY_BROKER_URL=f"redis://127.0.0.1:{redis.port}/0", DAGSTER_CELERY_BACKEND_URL=f"redis://127.0.0.1:{redis.port}/1",
    )
    os.environ.update(postgres.env(db))
    instance = DagsterInstance.from_config(str(home))
    for pool in ("download", "gpu"):  # as README says: set the pools before the first runs
        instance.event_log_storage.set_concurrency_slots(pool, 2)
    files = write_shards(tmp_path / "in", site[1], web.base_url, SHARDS, ROWS, "cel", route=f"sleep/{IMAGE_DELAY_MS}/cel")
    shards = register_shards(Lake(env["LAION_ASSETS_LAKE"]), [str(tmp_path / "in")], instance)
    assert shards == [f.name.split(".")[0] for f in files]

    workers = Workers(env, tmp_path, postgres, redis, site[0], web.port)
    killed = None  # (run id, step) w1 was in when it was killed
    try:
        runs = [
            subprocess.Popen(
                [str(BIN / "dagster"), "asset", "materialize", "-m", "laion_assets.defs.definitions", "--select", SELECT, "--partition", shard],
                env=env, stdout=open(tmp_path / f"{shard}.log", "wb"), stderr=subprocess.STDOUT,
            )
            for shard in shards
        ]
        deadline = time.monotonic() + 400
        while any(r.poll() is None for r in runs):
            assert time.monotonic() < deadline, "runs did not finish"
            if killed is None:  # once w1 has done a step, kill it (the whole host) in its first download
                placed = {r.dagster_run.run_id: worker_of_steps(instance, r.dagster_run.run_id) for r in instance.get_run_records()}
                on_w1 = [(run_id, step) for run_id, steps in placed.items() for step, w in steps if w == "w1"]
                downloading = [(run_id, step) for run_id, step in on_w1
                               if step == KILLED_STEP and step_in_flight(instance, run_id, step)]
                if len(on_w1) >= 2 and downloading:
                    workers.kill("w1")
                    killed = downloading[0]
            time.sleep(0.2)
    finally:
        workers.close()
    assert [r.returncode for r in runs] == [0] * SHARDS, [(tmp_path / f"{s}.log").read_text()[-3000:] for s in shards]
    assert killed, f"w1 was never killed in {KILLED_STEP}"

    run_ids = [r.dagster_run.run_id for r in instance.get_run_records()]
    logs = RunLogs(instance, run_ids)
    assert_every_gate_passed(logs, shards)
    counts = assert_every_shard_once(env["LAION_ASSETS_LAKE"], shards, ROWS)
    retaken = worker_of_steps(instance, killed[0])
    assert (killed[1], "w2") in retaken[retaken.index((killed[1], "w1")):]  # the other host ran the step again
    spans = {w: task_spans(workers.logs[w]) for w in ("w1", "w2")}
    side_by_side = max_overlap(spans["w1"] + spans["w2"])
    assert side_by_side == 2  # both hosts ran shard steps at the same time
    print(f"\nhosts: {workers.why_not_hosts or 'network namespaces'}; steps done per worker "
          f"{ {w: len(s) for w, s in spans.items()} }; w1 killed in {killed[1]}, retaken by w2; rows {counts}")
