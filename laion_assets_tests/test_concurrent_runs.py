"""Several `laion-assets run` at once on one lake and one fresh sqlite instance, as a user with
many shards tries first in parallel terminals: every shard is computed once, the tables equal
a one-process run's, and the instance stays usable."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterEventType, DagsterInstance
from dagster._core.instance.ref import InstanceRef

from laion_assets.core.lake.delta import Lake
from laion_assets_tests.conftest import REPO, make_config, write_config
from laion_assets_tests.test_runs import cli_env, write_instance

TABLES = ("raw_urls", "images", "embeddings/tiny")
VARYING = {"duration_s", "attempts"}  # timings; the rest must match row for row


def _table(lake: Path, name: str) -> pl.DataFrame:
    df = Lake(str(lake)).scan(name).collect()
    return df.drop([c for c in df.columns if c in VARYING]).sort("shard", "uid")


def _materializations(home: Path) -> dict[tuple[str, str], int]:
    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
    counts: dict[tuple[str, str], int] = {}
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
            event = entry.dagster_event
            key = (event.asset_key.to_user_string(), event.partition)
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.slow
def test_four_runs_at_once_compute_every_shard_once(tmp_path, shard_rows):
    inputs = tmp_path / "input"
    inputs.mkdir()
    shards = "abcd"
    for s in shards:
        shard_rows.head(40).write_parquet(inputs / f"shard-{s}.parquet")
    config = write_config(tmp_path / "config.yaml", make_config())

    def cli(lake: Path, names: str) -> list[str]:
        files = [str(inputs / f"shard-{s}.parquet") for s in names]
        return [sys.executable, "-m", "laion_assets.cli", "run", *files, "--lake", str(lake), "--config", str(config),
                "--select", "raw_urls,images,embeddings"]

    home, lake = write_instance(tmp_path / "home"), tmp_path / "lake"
    assert not (home / "storage").exists()  # a fresh instance: created by the runs, at once
    started = time.monotonic()
    procs = [subprocess.Popen(cli(lake, names), env=cli_env(home), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for names in ("ab", "ab", "c", "bcd")]  # overlapping and disjoint
    outs = [p.communicate(timeout=900) for p in procs]
    print(f"4 runs at once: {time.monotonic() - started:.0f} s")
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
        assert "Traceback" not in out + err, err
    assert any("another laion-assets run is computing it (pid " in out for out, _ in outs)  # a shard was waited for

    counts = _materializations(home)
    assert counts == {(asset, f"shard-{s}"): 1 for asset in ("raw_urls", "images", "embeddings_tiny") for s in shards}, counts

    ref_home, ref_lake = write_instance(tmp_path / "ref_home"), tmp_path / "ref_lake"
    one = subprocess.run(cli(ref_lake, shards), env=cli_env(ref_home), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stdout + one.stderr
    for name in TABLES:
        assert _table(lake, name).equals(_table(ref_lake, name)), name
        # as many commits as one process made: no shard published twice
        assert len(Lake(str(lake)).table(name).history()) == len(Lake(str(ref_lake)).table(name).history()), name

    for db in (home / "storage").rglob("*.db"):  # one alembic head each
        with sqlite3.connect(db) as conn:
            tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
            if "alembic_version" in tables:
                assert conn.execute("select count(*) from alembic_version").fetchone()[0] == 1, db
    again = subprocess.run(cli(lake, shards), env=cli_env(home), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("every selected stage is up to date") == len(shards)
