"""The curation layer in Dagster: lineage between the shard stages and the subsets, the
passes through a real instance with their figures per shard and in total, automation after
shard changes (without re-running every subset shard), and the sensor on the list location."""

from __future__ import annotations

import polars as pl
import pytest
from dagster import (
    AssetKey,
    RunRequest,
    SkipReason,
    build_sensor_context,
    evaluate_automation_conditions,
    instance_for_test,
    materialize,
)

from laion_assets.cli.pipeline import run_pipeline
from laion_assets.core.curation.config import BlocklistConfig, CurationConfig, SemanticDedupConfig
from laion_assets.core.lake.delta import Lake
from laion_assets.core.subsets.rules import SubsetConfig
from laion_assets.defs.curation import blocked, dedup_keys, duplicates
from laion_assets.defs.definitions import build_defs
from laion_assets.defs.resources import LakeResource, PipelineResource, Settings
from laion_assets_tests.conftest import make_config, write_config
from laion_assets_tests.lakes import config, publish_shard, publish_subsets, row, sha

SHARDS = {
    "a": [row(1, "http://ex.com/1.jpg", "one"), row(2, "http://ex.com/2.jpg", "two")],
    "b": [row(3, "http://ex.com/1.jpg", "three"), row(4, "http://ex.com/4.jpg", "two"), row(5, "http://ex.com/5.jpg", "five")],
}


@pytest.fixture
def setup(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    cfg = config(
        SubsetConfig(name="everything"), SubsetConfig(name="unique", exclude_duplicates=("url", "sha256")),
        curation=CurationConfig(blocklists=BlocklistConfig(location=str(lists)),
                                semantic=(SemanticDedupConfig(subset="unique", clusters=2),)),
    )
    path = write_config(tmp_path / "config.yaml", cfg)
    lake = Lake(tmp_path / "lake")
    for shard, rows in SHARDS.items():
        publish_shard(lake, shard, rows)
    publish_subsets(lake, cfg, list(SHARDS))
    resources = {"lake": LakeResource(uri=lake.uri), "pipeline": PipelineResource(config_path=str(path))}
    defs = build_defs(Settings(lake=lake.uri, inputs=str(tmp_path / "input"), config=str(path)))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", list(SHARDS))
        yield lake, lists, resources, defs, instance


def test_lake_wide_assets_sit_between_the_shard_stages_and_the_subsets(setup):
    _, _, _, defs, _ = setup
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in graph.get_all_asset_keys()}
    assert parents["curation/dedup_keys"] == {"images"}
    assert parents["curation/duplicates"] == {"curation/dedup_keys"} and parents["curation/blocked"] == {"images"}
    assert {"curation/duplicates", "curation/blocked"} <= parents["subsets/unique"]
    assert parents["curation/semdedup_unique"] == {"subsets/unique", "embeddings_tiny"}
    assert graph.get(AssetKey(["curation", "dedup_keys"])).partitions_def.name == "shards"
    for key in ("duplicates", "blocked"):
        node = graph.get(AssetKey(["curation", key]))
        assert node.partitions_def is None and node.pools == {"curation"}


def test_passes_through_dagster_show_figures_and_update_subsets(setup):
    _, lists, resources, defs, instance = setup
    for shard in SHARDS:
        assert materialize([dedup_keys], partition_key=shard, resources=resources, instance=instance).success
    (lists / "partner.md5.txt").write_text(f"# source: test partner\n{sha('five', 'md5')}\n")
    assert materialize([duplicates, blocked], resources=resources, instance=instance).success

    dup = instance.get_latest_materialization_event(AssetKey(["curation", "duplicates"])).asset_materialization.metadata
    assert dup["duplicates_total"].data == {"url": 1, "sha256": 1, "phash": 1}
    assert "| b | 1 | 1 | 1 |" in dup["duplicates_per_shard"].value  # per shard: url, sha256, phash
    block = instance.get_latest_materialization_event(AssetKey(["curation", "blocked"])).asset_materialization.metadata
    assert block["rows_blocked_total"].value == 1 and block["diff_rows"].data == {"removed": 1, "restored": 0}
    assert "| b | 1 |" in block["blocked_per_shard"].value and len(block["diff_files"].data) == 2
    # the subset shards the passes changed show a materialization (what reads subsets sees it)
    for subset in ("unique", "everything"):
        records = instance.fetch_materializations(AssetKey(["subsets", subset]), limit=100).records
        assert {r.partition_key for r in records} == {"b"}
    # SemDeDup over what is left of `unique`, through Dagster too
    semdedup = next(a for a in defs.assets if getattr(a, "key", None) == AssetKey(["curation", "semdedup_unique"]))
    assert materialize([semdedup], resources=resources, instance=instance).success
    sem = instance.get_latest_materialization_event(semdedup.key).asset_materialization.metadata
    assert sem["rows"].value == 2 and sem["recipe"].data["space"] == "tiny"


@pytest.mark.slow
def test_shard_changes_trigger_the_passes_not_every_subset_shard(setup):
    _, _, resources, defs, instance = setup
    baseline = evaluate_automation_conditions(defs=defs, instance=instance)
    assert baseline.total_requested == 0
    assert materialize([dedup_keys], partition_key="b", resources=resources, instance=instance).success
    after_keys = evaluate_automation_conditions(defs=defs, instance=instance, cursor=baseline.cursor)
    assert after_keys.get_num_requested(AssetKey(["curation", "duplicates"])) == 1
    assert materialize([duplicates], resources=resources, instance=instance).success
    after_pass = evaluate_automation_conditions(defs=defs, instance=instance, cursor=after_keys.cursor)
    assert after_pass.get_num_requested(AssetKey(["subsets", "unique"])) == 0  # the pass updated them itself
    assert after_pass.get_num_requested(AssetKey(["curation", "duplicates"])) == 0


def test_sensor_runs_the_blocklist_pass_when_the_lists_change(setup, tmp_path):
    _, lists, resources, defs, instance = setup
    sensor = defs.get_sensor_def("blocklist_files")

    def tick(cursor):
        with build_sensor_context(instance=instance, resources={"pipeline": resources["pipeline"]}, cursor=cursor) as ctx:
            return sensor(ctx), ctx.cursor

    first, cursor = tick(None)
    assert isinstance(first, RunRequest)
    assert isinstance(tick(cursor)[0], SkipReason)
    (lists / "partner.sha1.txt").write_text(sha("one", "sha1") + "\n")
    changed, cursor2 = tick(cursor)
    assert isinstance(changed, RunRequest) and cursor2 != cursor
    assert changed.asset_selection is None or AssetKey(["curation", "blocked"]) in changed.asset_selection
    none = write_config(tmp_path / "plain.yaml", config())
    with build_sensor_context(instance=instance, resources={"pipeline": PipelineResource(config_path=str(none))}) as ctx:
        assert isinstance(sensor(ctx), SkipReason)


@pytest.mark.slow
def test_two_copies_of_a_shard_through_the_pipeline(tmp_path, shard_rows):
    """The same rows in two shard files, downloaded, embedded and scored through Dagster: the
    lake-wide pass marks every stored row of the second shard, and only the subset whose
    recipe excludes duplicates leaves them out."""
    inputs = tmp_path / "input"
    inputs.mkdir()
    shard_rows.write_parquet(inputs / "shard-a.parquet")
    shard_rows.write_parquet(inputs / "shard-b.parquet")
    cfg = make_config(subsets=(SubsetConfig(name="all", min_similarity=-1.0), SubsetConfig(name="unique", min_similarity=-1.0, exclude_duplicates=("url",))))
    lake = Lake(tmp_path / "lake")
    with instance_for_test() as instance:
        summary = run_pipeline([str(inputs)], lake.uri, str(write_config(tmp_path / "c.yaml", cfg)), None, instance=instance)
    assert summary.ok, summary.lines
    stored = pl.read_delta(lake.table_uri("images")).filter(pl.col("status") == "success")
    marks = pl.read_delta(lake.table_uri("curation/duplicates")).filter(pl.col("kind") == "url")
    assert set(marks["shard"]) == {"shard-b"} and marks.height == stored.filter(pl.col("shard") == "shard-b").height > 0
    unique = pl.read_delta(lake.table_uri("subsets/unique"))
    everything = pl.read_delta(lake.table_uri("subsets/all"))
    assert set(unique["shard"]) == {"shard-a"} and set(everything["shard"]) == {"shard-a", "shard-b"}


def test_the_ui_shows_an_export_behind_its_subset_as_unsynced(setup):
    """A pass that takes a row out of a subset brings the shard's webdataset export along and
    says so in Dagster (the partition stays in sync); a subset shard republished without its
    export shows the export as unsynced, and train-args' check calls it stale."""
    from dagster._core.definitions.data_version import StaleStatus
    from dagster._utils.test.data_versions import get_stale_status_resolver

    from laion_assets.core.exports import freshness
    from laion_assets.defs.keys import subset_key, webdataset_key

    lake, lists, resources, defs, instance = setup
    export = next(a for a in defs.assets if webdataset_key("everything") in getattr(a, "keys", ()))
    subset = next(a for a in defs.assets if subset_key("everything") in getattr(a, "keys", ()))

    def status(shard):
        return get_stale_status_resolver(instance, defs.assets).get_status(webdataset_key("everything"), shard)

    for shard in SHARDS:
        assert materialize([subset], partition_key=shard, resources=resources, instance=instance, selection=[subset_key("everything")]).success
        assert materialize([export], partition_key=shard, resources=resources, instance=instance).success
    assert status("a") == status("b") == StaleStatus.FRESH
    (lists / "partner.md5.txt").write_text(sha("five", "md5") + "\n")
    assert materialize([blocked], resources=resources, instance=instance).success
    assert status("b") == StaleStatus.FRESH and freshness.stale_exports(lake, "everything") == []
    latest = instance.get_latest_materialization_event(webdataset_key("everything")).asset_materialization
    assert latest.partition == "b" and latest.metadata["changed_by"].value == "curation/blocked"

    assert materialize([subset], partition_key="a", resources=resources, instance=instance, selection=[subset_key("everything")]).success
    assert status("a") == StaleStatus.STALE and freshness.stale_exports(lake, "everything") == ["a"]
