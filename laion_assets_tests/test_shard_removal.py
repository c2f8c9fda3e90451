"""A shard file that disappears: the sensor removes a shard that never published anything (its
partition would only ever fail), keeps a published one and says how to remove it; a file
added again is a new shard that runs again."""

from __future__ import annotations

import polars as pl
import pytest
from dagster import SensorResult, SkipReason, build_sensor_context, instance_for_test

from laion_assets.core.ingest import registry
from laion_assets.core.lake.delta import Lake
from laion_assets.defs.definitions import build_defs
from laion_assets.defs.resources import InputsResource, LakeResource, Settings


@pytest.fixture
def setup(tmp_path):
    inputs = tmp_path / "input"
    inputs.mkdir()
    frame = pl.DataFrame({"URL": ["http://127.0.0.1/a.jpg"], "TEXT": ["a"]})
    for name in ("kept", "dropped"):
        frame.write_parquet(inputs / f"{name}.parquet")
    lake = str(tmp_path / "lake")
    sensor = build_defs(Settings(lake=lake, inputs=str(inputs))).get_sensor_def("shard_files")
    resources = {"inputs": InputsResource(location=str(inputs)), "lake": LakeResource(uri=lake)}
    with instance_for_test() as instance:

        def tick():
            with build_sensor_context(instance=instance, resources=resources) as ctx:
                result = sensor(ctx)
            for req in getattr(result, "dynamic_partitions_requests", None) or []:  # what the daemon does
                if type(req).__name__.startswith("Add"):
                    instance.add_dynamic_partitions("shards", req.partition_keys)
                else:
                    for key in req.partition_keys:
                        instance.delete_dynamic_partition("shards", key)
            return result

        yield tick, inputs, Lake(lake), instance


def test_vanished_files_remove_unpublished_shards_and_keep_published_ones(setup, capfd):
    tick, inputs, lake, instance = setup
    first = tick()
    assert sorted(r.partition_key for r in first.run_requests) == ["dropped", "kept"]
    lake.publish_shard("raw_urls", "kept", pl.DataFrame({"uid": [1], "url": ["http://127.0.0.1/a.jpg"]}))
    lake.append("_staging/images", pl.DataFrame({"uid": [1]}), shard="dropped")  # a run that never published

    (inputs / "kept.parquet").unlink()
    (inputs / "dropped.parquet").unlink()
    second = tick()
    assert isinstance(second, SensorResult) and not second.run_requests
    assert instance.get_dynamic_partitions("shards") == ["kept"]
    assert set(registry.registered(lake)) == {"kept"}
    assert pl.read_delta(lake.table_uri("_staging/images")).height == 0  # nothing of it is left
    assert lake.shard_row_count("raw_urls", "kept") == 1  # published data is never dropped by a tick
    assert "laion-assets remove-shard kept" in capfd.readouterr().err

    quiet = tick()  # nothing changed since: the tick says so, and names the kept shard
    assert isinstance(quiet, SkipReason) and "laion-assets remove-shard kept" in quiet.skip_message
    pl.DataFrame({"URL": ["http://127.0.0.1/b.jpg"], "TEXT": ["b"]}).write_parquet(inputs / "dropped.parquet")
    again = tick()  # the same name again is a new shard, and runs again (a new run key)
    assert [r.partition_key for r in again.run_requests] == ["dropped"]
    [old] = [r.run_key for r in first.run_requests if r.partition_key == "dropped"]
    assert again.run_requests[0].run_key != old
