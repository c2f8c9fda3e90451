"""Partitions at scale, the CI-sized version of benchmarks/bench_partitions.py (which measures
60,000): a bulk drop of shard files is registered by one `shard_files` tick of a real daemon
on Postgres and handed over as one backfill, which the backfill daemon turns into runs."""

from __future__ import annotations

import importlib.util

import pytest

from laion_assets.defs.sensors import BACKFILL_ABOVE
from laion_assets_tests.conftest import REPO

pytestmark = pytest.mark.slow


def bench():
    spec = importlib.util.spec_from_file_location("bench_partitions", REPO / "benchmarks/bench_partitions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_bulk_drop_of_shards_becomes_partitions_and_one_backfill(tmp_path):
    shards = BACKFILL_ABOVE + 50
    figures = bench().run(shards=shards, backfill=0, ui=False, root=tmp_path, observe=3, timeout=240)
    assert figures["partitions"] == shards  # every file registered in one tick
    assert figures["runs_from_sensor_tick"] == 0 and figures["requests_from_tick"] == 1  # one backfill, no run each
    assert figures["sensor_backfill_runs_per_s"] > 0  # the backfill daemon turns it into queued runs
    print(f"\n{shards} shards: sensor tick {figures['tick_s']} s, backfill runs {figures['sensor_backfill_runs_per_s']}/s")
