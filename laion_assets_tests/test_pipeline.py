"""The whole pipeline through Dagster: a real instance, real HTTP server, real Delta tables,
real GX validations and a real (tiny) open_clip forward pass."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import duckdb
import polars as pl
import pytest
from dagster import (
    AssetCheckKey,
    AssetKey,
    DagsterInstance,
    DefaultScheduleStatus,
    SensorResult,
    SkipReason,
    build_sensor_context,
    evaluate_automation_conditions,
    instance_for_test,
)

from laion_assets.cli.pipeline import run_pipeline
from laion_assets.core.lake.delta import Lake
from laion_assets.defs.definitions import build_defs
from laion_assets.defs.resources import InputsResource, LakeResource, Settings
from laion_assets_tests.conftest import asset_key, make_config, write_config

STAGES = ["raw_urls", "images", "language", "embeddings/tiny", "scores", "subsets/similar", "subsets/pretty"]
CURATION = ["curation/dedup_keys", "curation/duplicates", "curation/blocked"]  # no GX gate; lake-wide except dedup_keys


@pytest.fixture
def instance():
    with instance_for_test() as inst:
        yield inst


@pytest.fixture
def env(tmp_path, shard_rows):
    inputs = tmp_path / "input"
    inputs.mkdir()
    shard_rows.write_parquet(inputs / "shard-a.parquet")
    config = write_config(tmp_path / "config.yaml", make_config())
    return {"inputs": inputs, "lake": str(tmp_path / "lake"), "config": str(config), "tmp": tmp_path}


def run(env, instance: DagsterInstance, inputs=None, config=None, select=None, force=False):
    return run_pipeline([str(inputs or env["inputs"])], env["lake"], config or env["config"], select, instance=instance, force=force)


def statuses(summary) -> dict[str, str]:
    return {line.asset: line.status for line in summary.lines}


def duckdb_count(path: str) -> int:
    ext = glob.glob(os.path.join(os.path.dirname(duckdb.__file__), "..", "duckdb_ext", "extensions", "*", "*", "delta.duckdb_extension"))[0]
    con = duckdb.connect()
    con.execute(f"LOAD '{ext}'")
    return con.execute(f"SELECT count(*) FROM delta_scan('{path}')").fetchone()[0]


def test_asset_graph_snapshot(env):
    defs = build_defs(Settings(lake=env["lake"], inputs=str(env["inputs"]), config=env["config"]))
    graph = defs.resolve_asset_graph()
    deps = {k.to_user_string(): sorted(p.to_user_string() for p in graph.get(k).parent_keys) for k in graph.get_all_asset_keys()}
    assert deps == {
        "raw_urls": [],
        "images": ["raw_urls"],
        "language": ["raw_urls"],
        "embeddings_tiny": ["images"],
        "scores": ["embeddings_tiny", "images"],
        "subsets/similar": ["curation/blocked", "curation/duplicates", "embeddings_tiny", "images", "language", "raw_urls", "scores"],
        "subsets/pretty": ["curation/blocked", "curation/duplicates", "embeddings_tiny", "images", "language", "raw_urls", "scores"],
        "curation/dedup_keys": ["images"],
        "curation/duplicates": ["curation/dedup_keys"],
        "curation/blocked": ["images"],
        "lake_summary": ["curation/dedup_keys", "embeddings_tiny", "images", "language", "raw_urls", "scores", "subsets/pretty", "subsets/similar"],
    }
    for key in (k for k in graph.get_all_asset_keys() if k.path[0] not in ("curation", "lake_summary")):
        node = graph.get(key)
        assert node.partitions_def.name == "shards"
        assert [c.name for c in node.check_keys] == ["quality_gate"]
        [check] = node.check_keys
        assert graph.get(check).partitions_def.name == "shards"  # one result per shard
    assert {graph.get(k).group_name for k in graph.get_all_asset_keys()} == {"laion"}  # one group: the chain shows
    assert graph.get(AssetKey("images")).pools == {"download"}
    assert graph.get(AssetKey("embeddings_tiny")).pools == {"gpu"}
    assert graph.get(AssetKey("raw_urls")).automation_condition is None  # the sensor starts it
    assert "upstream gates passed" in str(graph.get(AssetKey("images")).automation_condition)


def test_lineage_labels_name_each_node_once(env):
    """The UI labels a node with the last part of its key: a subset, its export, its index and
    its SemDeDup must not all read `similar`, nor a space's embeddings just `tiny`."""
    from laion_assets.defs.keys import lake_paths

    cfg = make_config(export={}, knn={}, curation={"semantic": [{"subset": "similar"}]})
    defs = build_defs(Settings(lake=env["lake"], inputs=str(env["inputs"]), config=str(write_config(env["tmp"] / "all.yaml", cfg))))
    graph = defs.resolve_asset_graph()
    labels = [k.path[-1] for k in graph.get_all_asset_keys()]
    assert len(labels) == len(set(labels)), sorted(labels)
    assert {"embeddings_tiny", "similar", "webdataset_similar", "knn_similar", "semdedup_similar"} <= set(labels)
    paths = lake_paths(graph)  # where each lives in the lake is unchanged
    assert paths[AssetKey("embeddings_tiny")] == "embeddings/tiny" and paths[AssetKey("knn_similar")] == "knn/similar"
    assert paths[AssetKey(["curation", "semdedup_similar"])] == "curation/semdedup/similar"
    assert graph.get(AssetKey("webdataset_similar")).tags["stage"] == "export"


@pytest.mark.slow
def test_end_to_end_every_stage(env, instance, site):
    summary = run(env, instance)
    assert statuses(summary) == {s: "materialized" for s in STAGES + CURATION + ["lake_summary"]}, summary.lines
    lake = Lake(env["lake"])

    images = pl.read_delta(lake.table_uri("images"))
    by_kind = dict(
        images.with_columns(kind=pl.col("url").str.extract(r"//[^/]+/([a-z]+)/")).group_by("kind", "status").len().select("kind", "status").iter_rows()
    )
    assert by_kind == {
        "img": "success", "missing": "http_error", "error": "http_error", "html": "failed_decode",
        "truncated": "failed_decode", "noai": "opted_out", "redirect": "success",
    }
    assert images.height == len(site[1]) + 16  # one row per usable input row
    ok = images.filter(pl.col("status") == "success")
    assert ok["image"].null_count() == 0 and ok["sha256"].str.len_chars().unique().to_list() == [64]
    assert ok.select((pl.min_horizontal("width", "height") == 256) | (pl.col("original_width") < 256) | (pl.col("original_height") < 256)).to_series().all()

    emb = pl.read_delta(lake.table_uri("embeddings/tiny"))
    assert emb.height == ok.height and emb["similarity"].is_between(-1, 1).all()
    assert emb["embedding_space"].unique().to_list() == ["tiny/random-seed0"]
    scores = pl.read_delta(lake.table_uri("scores"))
    assert scores.height == ok.height and scores["punsafe"].is_between(0, 1).all()

    # tables are plain Delta: polars and duckdb read them without our code
    for table in ["raw_urls", "images", "embeddings/tiny", "scores", "subsets/similar", "subsets/pretty"]:
        assert duckdb_count(lake.table_uri(table)) == pl.read_delta(lake.table_uri(table)).height
    similar = pl.read_delta(lake.table_uri("subsets/similar"))
    assert similar.height > 0 and {"url", "caption", "similarity", "punsafe", "aesthetic", "recipe_id", "source_WIDTH"} <= set(similar.columns)

    # materialization metadata and blocking checks, as the UI shows them
    mat = instance.get_latest_materialization_event(AssetKey("images")).asset_materialization
    assert mat.metadata["dagster/row_count"].value == images.height
    assert mat.metadata["delta_version"].value == 0
    assert mat.metadata["status_counts"].data["success"] == ok.height
    assert "dagster/column_schema" in mat.metadata
    recipe = instance.get_latest_materialization_event(AssetKey(["subsets", "similar"])).asset_materialization.metadata["recipe"].data
    assert recipe["rule"]["min_similarity"] == -1.0 and recipe["similarity"]["model"] == "tiny/random-seed0"
    commit = lake.table("subsets/similar").history(1)[0]
    assert '"recipe_id"' in commit["recipe"] and commit["code_version"]  # the recipe is stored with the table
    preview = instance.get_latest_materialization_event(AssetKey("raw_urls")).asset_materialization.metadata["preview"].value
    assert preview.startswith("| uid | url | caption |") and preview.count("\n") == 6  # header, rule, 5 rows
    for stage in STAGES:
        key = AssetCheckKey(asset_key(stage), "quality_gate")
        [record] = instance.event_log_storage.get_asset_check_execution_history(key, limit=5)  # one per run
        assert (record.status.value, record.partition) == ("SUCCEEDED", "shard-a"), stage
    logged = [e.message for r in instance.get_run_records() for e in instance.all_logs(r.dagster_run.run_id)]
    assert not [m for m in logged if "not selected" in m]  # each stage records its own gate, quietly


@pytest.mark.slow
def test_rematerializing_a_shard_replaces_it(env, instance):
    run(env, instance, select="raw_urls,images")
    lake = Lake(env["lake"])
    first = pl.read_delta(lake.table_uri("images")).drop("duration_s").sort("uid")
    summary = run(env, instance, select="raw_urls,images", force=True)
    assert statuses(summary) == {"raw_urls": "materialized", "images": "materialized"}
    again = pl.read_delta(lake.table_uri("images")).drop("duration_s").sort("uid")
    assert again.equals(first)  # same rows, no duplicates
    assert lake.table("images").version() == 1


@pytest.mark.slow
def test_failed_gate_publishes_nothing_and_stops_downstream(env, instance):
    run(env, instance, select="raw_urls,images")
    lake = Lake(env["lake"])
    before = pl.read_delta(lake.table_uri("images")).drop("duration_s").sort("uid")
    strict = write_config(env["tmp"] / "strict.yaml", make_config(download=make_config().download.model_copy(update={"min_success_rate": 1.0})))

    summary = run(env, instance, config=str(strict))

    assert statuses(summary) == {
        "raw_urls": "up to date", "images": "FAILED", "language": "materialized", "embeddings/tiny": "skipped", "scores": "skipped",
        "subsets/similar": "skipped", "subsets/pretty": "skipped",
        **{c: "skipped" for c in CURATION}, "lake_summary": "skipped",
    }
    assert "failed validation" in next(line.detail for line in summary.lines if line.asset == "images")
    after = pl.read_delta(lake.table_uri("images")).drop("duration_s").sort("uid")
    assert after.equals(before) and lake.table("images").version() == 0
    assert not lake.exists("embeddings/tiny")
    key = AssetCheckKey(AssetKey("images"), "quality_gate")
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    assert record.status.value == "FAILED"
    evaluation = record.event.dagster_event.event_specific_data
    assert "FAILED" in evaluation.metadata["expect_column_values_to_be_in_set(is_success)"].value
    assert record.partition == "shard-a" and evaluation.description.startswith("shard shard-a not published")
    # the stages after images did not run: their gates say nothing of this shard (no "Execution
    # failed" for a check that never ran)
    for stage in ("embeddings/tiny", "scores", "subsets/similar", "subsets/pretty"):
        assert not instance.event_log_storage.get_asset_check_execution_history(AssetCheckKey(asset_key(stage), "quality_gate"), limit=5), stage


def test_a_run_that_selects_the_gate_gets_it_as_its_result(env, instance):
    """Materializing one asset from its page selects its check: the stage yields the result
    Dagster planned, which resolves the planned record (no second one)."""
    run(env, instance, select="raw_urls")
    defs = build_defs(Settings(lake=env["lake"], inputs=str(env["inputs"]), config=env["config"]))
    key = AssetCheckKey(AssetKey("raw_urls"), "quality_gate")
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={AssetKey("raw_urls")}, asset_check_selection={key})
    result = job.execute_in_process(instance=instance, partition_key="shard-a")
    assert result.success and [e.asset_check_key for e in result.get_asset_check_evaluations()] == [key]
    records = instance.event_log_storage.get_asset_check_execution_history(key, limit=5)
    assert [(r.run_id, r.status.value, r.partition) for r in records][0] == (result.run_id, "SUCCEEDED", "shard-a")
    assert len(records) == 2  # the CLI run's and this one's


def test_sensor_registers_new_files_once(env, instance, shard_rows):
    defs = build_defs(Settings(lake=env["lake"], inputs=str(env["inputs"]), config=env["config"]))
    sensor = defs.get_sensor_def("shard_files")

    resources = {"inputs": InputsResource(location=str(env["inputs"])), "lake": LakeResource(uri=env["lake"])}

    def tick():
        with build_sensor_context(instance=instance, resources=resources) as ctx:
            return sensor(ctx)

    first = tick()
    assert isinstance(first, SensorResult)
    assert first.dynamic_partitions_requests[0].partition_keys == ["shard-a"]
    assert [r.partition_key for r in first.run_requests] == ["shard-a"]
    instance.add_dynamic_partitions("shards", ["shard-a"])  # what the daemon does with the request

    assert isinstance(tick(), SkipReason)  # same file again: nothing new

    shard_rows.head(5).write_csv(env["inputs"] / "shard-b.csv")
    third = tick()
    assert third.dynamic_partitions_requests[0].partition_keys == ["shard-b"]
    assert [r.partition_key for r in third.run_requests] == ["shard-b"]


@pytest.mark.slow
def test_downstream_follows_only_passed_checks(env, instance, tmp_path):
    defs = build_defs(Settings(lake=env["lake"], inputs=str(env["inputs"]), config=env["config"]))
    baseline = evaluate_automation_conditions(defs=defs, instance=instance)
    assert baseline.total_requested == 0

    run(env, instance, select="raw_urls")  # its gate passed
    after_raw = evaluate_automation_conditions(defs=defs, instance=instance, cursor=baseline.cursor)
    assert after_raw.get_requested_partitions(AssetKey("images")) == {"shard-a"}
    # with a per-shard blocking gate, the next stage comes along in the same run: there, a
    # failed images gate stops it (the requests below show the same across runs)
    assert after_raw.get_requested_partitions(AssetKey("embeddings_tiny")) == {"shard-a"}

    # images fails its gate: nothing is published, so embeddings is not requested
    strict = write_config(tmp_path / "strict.yaml", make_config(download=make_config().download.model_copy(update={"min_success_rate": 1.0})))
    assert statuses(run(env, instance, config=str(strict), select="images")) == {"images": "FAILED"}
    after_fail = evaluate_automation_conditions(defs=defs, instance=instance, cursor=after_raw.cursor)
    assert after_fail.get_num_requested(AssetKey("embeddings_tiny")) == 0

    # images passes: embeddings follows
    assert statuses(run(env, instance, select="images")) == {"images": "materialized"}
    after_ok = evaluate_automation_conditions(defs=defs, instance=instance, cursor=after_fail.cursor)
    assert after_ok.get_requested_partitions(AssetKey("embeddings_tiny")) == {"shard-a"}


@pytest.mark.slow
def test_unknown_model_and_mismatched_head_fail_clearly(env, instance):
    from laion_assets.core.embeddings.config import EmbeddingConfig, SpaceConfig
    from laion_assets.core.scores.config import HeadConfig, ScoresConfig
    from laion_assets_tests.conftest import BUNDLED

    bad_model = write_config(env["tmp"] / "m.yaml", make_config(embeddings=EmbeddingConfig(spaces={"tiny": SpaceConfig(model="ViT-Q-99")})))
    summary = run(env, instance, config=str(bad_model))
    detail = {line.asset: (line.status, line.detail) for line in summary.lines}
    assert detail["images"][0] == "materialized"
    assert detail["embeddings/tiny"][0] == "FAILED" and "open_clip has no model 'ViT-Q-99'" in detail["embeddings/tiny"][1]

    l14 = BUNDLED / "laion-aesthetic-predictor" / "sa_0_4_vit_l_14_linear.pth"
    bad_head = write_config(env["tmp"] / "h.yaml", make_config(scores=ScoresConfig(heads={"aesthetic": HeadConfig(path=str(l14))}, allow_embedding_space_mismatch=True), subsets=()))
    summary = run(env, instance, config=str(bad_head), select="embeddings/tiny,scores")
    detail = {line.asset: (line.status, line.detail) for line in summary.lines}
    assert detail["scores"][0] == "FAILED" and "expects 768-d embeddings but the model gives 512-d" in detail["scores"][1]


def test_cli_errors_are_one_line(env, tmp_path, capsys):
    from laion_assets.cli import main

    cfg = tmp_path / "typo.yaml"
    cfg.write_text("download:\n  concurency: 3\n")
    assert main(["run", str(env["inputs"]), "--lake", env["lake"], "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config file") and "unknown key 'download.concurency'" in err and "\n" not in err

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", str(env["inputs"]), "--lake", str(blocker / "lake"), "--config", env["config"]]) == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.slow
def test_dg_checks_and_lists_the_definitions():
    """Dagster's own CLI, as the README and Makefile use it: dg reads [tool.dg] in pyproject."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    dg = Path(sys.executable).with_name("dg")
    env = {**os.environ, "DAGSTER_HOME": str(repo), "LAION_ASSETS_CONFIG": str(repo / "configs" / "demo.yaml"),
           "VIRTUAL_ENV": str(Path(sys.executable).parent.parent)}
    checked = subprocess.run([str(dg), "check", "defs"], cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert checked.returncode == 0 and "All definitions loaded successfully" in checked.stdout, checked.stdout + checked.stderr
    listed = subprocess.run([str(dg), "list", "defs", "--json"], cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assets = {a["asset_key"] for a in json.loads(listed.stdout)["assets"]}
    assert {"raw_urls", "images", "scores", "subsets/laion2b_en_demo", "lake_summary"} <= assets


def test_maintenance_job_compacts_and_vacuums(env, instance):
    import polars as pl

    lake = Lake(env["lake"])
    for i in range(3):
        lake.publish_shard("raw_urls", "a", pl.DataFrame({"uid": [i]}))
    lake.publish_shard("raw_urls_rejected", "a", pl.DataFrame({"uid": [7]}))  # a table, not an asset
    lake.publish_shard("embeddings/tiny", "a", pl.DataFrame({"uid": [2]}))  # the table of asset embeddings_tiny
    cfg = write_config(env["tmp"] / "m.yaml", make_config(maintenance={"vacuum_retention_hours": 0, "target_file_size_mb": 1}))
    defs = build_defs(Settings(lake=env["lake"], inputs=str(env["inputs"]), config=str(cfg)))
    nightly = defs.resolve_schedule_def("nightly_maintenance")
    assert nightly.cron_schedule == "0 3 * * *" and nightly.default_status == DefaultScheduleStatus.RUNNING  # on without a click
    result = defs.resolve_job_def("lake_maintenance").execute_in_process(instance=instance)
    assert result.success
    observed = {e.asset_key: e.asset_observation_data.asset_observation for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"}
    # each table's result on its asset; no observation of raw_urls_rejected (it would show as an orphan asset)
    assert set(observed) == {AssetKey("raw_urls"), AssetKey("embeddings_tiny")}
    assert observed[AssetKey("raw_urls")].metadata["maintenance"].data["files_vacuumed"] >= 1
    assert len(list(Path(lake.table_uri("raw_urls")).rglob("*.parquet"))) == 1
    assert pl.read_delta(lake.table_uri("raw_urls"))["uid"].to_list() == [2]


def test_a_run_that_selected_the_later_gates_takes_them_back_when_a_stage_fails(env, instance, tmp_path):
    """Backfills select every check of their assets, so Dagster plans the later stages' gates:
    when images fails its gate, those stages will not run, and their planned gates are taken
    back instead of showing "Execution failed" for the shard."""
    run(env, instance, select="raw_urls")
    strict = write_config(tmp_path / "strict.yaml", make_config(download=make_config().download.model_copy(update={"min_success_rate": 1.0})))
    defs = build_defs(Settings(lake=env["lake"], inputs=str(env["inputs"]), config=str(strict)))
    job = defs.resolve_job_def("shard_pipeline")
    assets = {AssetKey("images"), AssetKey("language"), AssetKey("embeddings_tiny"), AssetKey("scores")}
    gates = {AssetCheckKey(key, "quality_gate") for key in assets}
    result = job.get_subset(asset_selection=assets, asset_check_selection=gates).execute_in_process(
        instance=instance, partition_key="shard-a", raise_on_error=False,
    )
    assert not result.success
    history = {key.asset_key.to_user_string(): [(r.status.value, r.partition) for r in instance.event_log_storage.get_asset_check_execution_history(key, limit=5)]
               for key in gates}
    assert history == {"images": [("FAILED", "shard-a")], "language": [("SUCCEEDED", "shard-a")], "embeddings_tiny": [], "scores": []}
