"""A deployment in a temp folder for the scale-out tests: a Dagster home made from the repo's
deploy/postgres/dagster.yaml (plus test overrides), tiny shards served on 127.0.0.1, the
environment a daemon, worker or code server needs, and the checks every scale-out test makes
(rows once per shard, every gate ran, pools and run limits respected), read from the instance."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import polars as pl
import yaml

from laion_assets_tests.conftest import REPO, asset_key, make_config, write_config

# The shard assets of make_config (one tiny embedding space) and their tables; every one but
# curation/dedup_keys has a quality_gate.
STAGES = ["raw_urls", "images", "language", "curation/dedup_keys", "embeddings/tiny", "scores", "subsets/similar", "subsets/pretty"]
GATED = [s for s in STAGES if s != "curation/dedup_keys"]
SELECT = ",".join(asset_key(s).to_user_string() for s in STAGES)  # their asset keys, for --select
BIN = Path(sys.executable).parent


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dagster_home(root: Path, overrides: dict | None = None, source: Path = REPO / "deploy/postgres/dagster.yaml") -> Path:
    """A DAGSTER_HOME holding the shipped instance config with `overrides` merged in; local
    artifacts and compute logs inside `root`."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(source.read_text())
    cfg = deep_merge(cfg, {
        "local_artifact_storage": {"config": {"base_dir": str(home / "storage")}},
        "compute_logs": {"config": {"base_dir": str(home / "logs")}},
    })
    (home / "dagster.yaml").write_text(yaml.safe_dump(deep_merge(cfg, overrides or {})))
    return home


def write_shards(folder: Path, entries: list[dict], base_url: str, n: int, rows: int = 5, prefix: str = "shard",
                 route: str = "img") -> list[Path]:
    """`n` tiny shards: `rows - 1` images each (rotating through the site) and one 404. `route`
    is the site's path to a file (see faultsite.Handler: `sleep/<ms>/<key>` serves it late)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [e for e in entries if e["width"] <= 700]
    paths = []
    for i in range(n):
        picked = [images[(i * (rows - 1) + j) % len(images)] for j in range(rows - 1)]
        df = pl.DataFrame({
            "URL": [f"{base_url}/{route}/{e['file']}" for e in picked] + [f"{base_url}/missing/{prefix}-{i}.jpg"],
            "TEXT": [f"{e['caption']} ({prefix} {i})" for e in picked] + [f"gone {i}"],
        })
        path = folder / f"{prefix}-{i:03d}.parquet"
        df.write_parquet(path)
        paths.append(path)
    return paths


def pipeline_env(root: Path, home: Path, pg_env: dict, executor: str = "in_process", **extra) -> dict:
    """Environment of every process of the deployment (daemon, code server, CLI, workers)."""
    inputs = root / "sensor-input"  # the shard_files sensor watches an empty folder
    inputs.mkdir(exist_ok=True)
    config = write_config(root / "pipeline.yaml", make_config())
    return {
        **os.environ, **pg_env, "DAGSTER_HOME": str(home), "LAION_ASSETS_LAKE": str(root / "lake"),
        "LAION_ASSETS_INPUT": str(inputs), "LAION_ASSETS_CONFIG": str(config),
        "LAION_ASSETS_EXECUTOR": executor, "PYTHONUNBUFFERED": "1",
        "LAION_ASSETS_DECODE": "thread",  # no decode worker processes: runs stay light on 2 cores
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # dagster-celery starts `celery`
        **extra,
    }


class Daemon:
    """`dagster-daemon run` over the repo's workspace.yaml, output in a log file."""

    def __init__(self, env: dict, log: Path):
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
            env=env, cwd=env["DAGSTER_HOME"], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for what is left of its group (code servers wait for their
        runs on SIGTERM, run workers outlive them)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def wait_backfill(instance, backfill_id: str, timeout: float, on_tick=None):
    from dagster._core.execution.backfill import BulkActionStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        backfill = instance.get_backfill(backfill_id)
        if backfill.status not in (BulkActionStatus.REQUESTED, BulkActionStatus.CANCELING):
            return backfill
        if on_tick:
            on_tick()
        time.sleep(0.5)
    raise TimeoutError(f"backfill {backfill_id} still {instance.get_backfill(backfill_id).status} after {timeout} s")


def shard_of(run) -> str | None:
    """The shard of a one-shard run: `dagster/partition`, or the range a backfill run carries
    (BackfillPolicy.multi_run(1): a range of one)."""
    return run.tags.get("dagster/partition") or run.tags.get("dagster/asset_partition_range_start")


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    level = peak = 0
    for _, d in points:  # an end sorts before a start at the same instant
        level += d
        peak = max(peak, level)
    return peak


class RunLogs:
    """What the runs' event logs say: each executed step's (start, end), the latest
    quality_gate result and the materializations per (stage, shard)."""

    def __init__(self, instance, run_ids: list[str]):
        from dagster import DagsterEventType as T

        self.steps: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.gates: dict[tuple[str, str], bool] = {}
        self.materialized: set[tuple[str, str]] = set()
        runs = sorted((instance.get_run_record_by_id(r) for r in run_ids), key=lambda r: r.create_timestamp)
        for record in runs:
            shard = shard_of(record.dagster_run)
            started = {}  # a step whose run died holds its pool slot until the run ends
            for rec in instance.all_logs(record.dagster_run.run_id):
                ev = rec.dagster_event
                if ev is None:
                    continue
                if ev.event_type == T.STEP_START:
                    started[ev.step_key] = rec.timestamp
                elif ev.event_type in (T.STEP_SUCCESS, T.STEP_FAILURE) and ev.step_key in started:
                    self.steps[ev.step_key].append((started.pop(ev.step_key), rec.timestamp))
                elif ev.event_type == T.ASSET_CHECK_EVALUATION:
                    data = ev.event_specific_data
                    self.gates[(data.asset_key.to_user_string(), shard)] = data.passed
                elif ev.event_type == T.ASSET_MATERIALIZATION:
                    self.materialized.add((ev.asset_key.to_user_string(), shard))
            for step, start in started.items():
                self.steps[step].append((start, record.end_time or time.time()))

    def pool_peak(self, steps: list[str]) -> int:
        return max_overlap([iv for step in steps for iv in self.steps.get(step, [])])


def assert_every_shard_once(lake_uri: str, shards: list[str], rows: int) -> dict[str, int]:
    """Every table holds each shard's rows exactly once; returns rows per table."""
    from laion_assets.core.lake.delta import Lake

    lake = Lake(lake_uri)
    counts = {}
    for table in STAGES:
        # a row is a uid, except in the dedup key index (several keys per image)
        row = ["uid", "kind", "key", "bucket"] if table == "curation/dedup_keys" else ["uid"]
        df = lake.scan(table).select("shard", *row).collect()
        assert not df.select(row).is_duplicated().any(), f"{table}: doubled rows"
        per_shard = dict(df.group_by("shard").len().iter_rows())
        if table in ("raw_urls", "images", "language"):
            assert per_shard == {s: rows for s in shards}, f"{table}: {per_shard}"
        elif table in ("embeddings/tiny", "scores"):  # every image but the 404
            assert per_shard == {s: rows - 1 for s in shards}, f"{table}: {per_shard}"
        elif table == "curation/dedup_keys":  # the keys of every image but the 404
            images = lake.scan(table).group_by("shard").agg(pl.col("uid").n_unique()).collect()
            assert dict(images.iter_rows()) == {s: rows - 1 for s in shards}, f"{table}: {images}"
        counts[table] = df.height
    emb = lake.scan("embeddings/tiny").select("uid").collect()["uid"].sort()
    assert emb.equals(lake.scan("scores").select("uid").collect()["uid"].sort())
    return counts


def assert_every_gate_passed(logs: RunLogs, shards: list[str]) -> None:
    """Each stage of each shard was materialized and its latest quality_gate passed."""
    want = {(asset_key(stage).to_user_string(), shard) for stage in STAGES for shard in shards}
    assert want <= logs.materialized, f"not materialized: {sorted(want - logs.materialized)[:10]}"
    failing = sorted((stage, shard) for stage in GATED for shard in shards if logs.gates.get((asset_key(stage).to_user_string(), shard)) is not True)
    assert not failing, f"gate missing or failed: {failing[:10]}"
