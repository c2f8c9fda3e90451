"""What the UI reads, through a real Dagster instance: per-shard check results with the reason
of a failure, expected failures as one line, pictures and column descriptions in each shard's
metadata, the lake summary, runs recorded in the UI's code location, and shard removal."""

from __future__ import annotations

import base64
import io
import re

import polars as pl
import pytest
from dagster import AssetCheckKey, AssetKey, DagsterEventType, instance_for_test
from dagster._core.storage.event_log.base import AssetRecordsFilter
from PIL import Image

from laion_assets.cli import main
from laion_assets.cli.pipeline import run_pipeline
from laion_assets.core.ingest import registry
from laion_assets.core.lake.delta import Lake
from laion_assets.defs.definitions import build_defs
from laion_assets.defs.resources import Settings
from laion_assets.defs.runs import run_shard
from laion_assets_tests.conftest import asset_key, make_config, write_config

pytestmark = pytest.mark.slow

STAGES = ["raw_urls", "images", "language", "embeddings/tiny", "scores", "subsets/similar", "subsets/pretty"]
PICTURES = {
    "images": ["thumbnails", "image_sizes"], "embeddings/tiny": ["similarity_histogram"],
    "scores": ["score_histograms", "thumbnails"], "subsets/similar": ["kept_histograms", "thumbnails"],
}


@pytest.fixture(scope="module")
def lake_run(tmp_path_factory, site, server):
    """Two shards through every stage: shard-a passes, shard-b's images all 404 (gate fails)."""
    from laion_assets.core.ingest.sample import sample_rows

    root = tmp_path_factory.mktemp("uimeta")
    rows = sample_rows(site[1], server.base_url)
    inputs = root / "input"
    inputs.mkdir()
    rows.filter(~pl.col("URL").fill_null("").str.contains("generated")).write_parquet(inputs / "shard-a.parquet")
    rows.filter(pl.col("URL").fill_null("").str.contains("/missing/")).write_parquet(inputs / "shard-b.parquet")
    config = write_config(root / "config.yaml", make_config())
    lake = str(root / "lake")
    with instance_for_test() as instance:
        summary = run_pipeline([str(inputs)], lake, str(config), None, instance=instance)
        defs = build_defs(Settings(lake=lake, inputs=str(inputs), config=str(config)))
        yield {"instance": instance, "summary": summary, "lake": Lake(lake), "defs": defs, "root": root, "inputs": inputs}


def checks(instance, asset: str) -> dict:
    key = AssetCheckKey(asset_key(asset), "quality_gate")
    history = instance.event_log_storage.get_asset_check_execution_history(key, limit=20)
    latest = {}
    for record in history:  # newest first
        latest.setdefault(record.partition, record)
    return latest


def materialization(instance, asset: str, shard: str | None):
    filt = AssetRecordsFilter(asset_key=asset_key(asset), asset_partitions=[shard] if shard else None)
    return instance.fetch_materializations(filt, limit=1).records[0].asset_materialization.metadata


def test_checks_are_per_shard_and_a_failure_says_why(lake_run):
    instance = lake_run["instance"]
    statuses = {(line.shard, line.asset): line.status for line in lake_run["summary"].lines}
    assert statuses[("shard-a", "subsets/pretty")] == "materialized" and statuses[("shard-b", "images")] == "FAILED"
    assert {s: r.status.value for s, r in checks(instance, "raw_urls").items()} == {"shard-a": "SUCCEEDED", "shard-b": "SUCCEEDED"}
    images = checks(instance, "images")
    assert {s: r.status.value for s, r in images.items()} == {"shard-a": "SUCCEEDED", "shard-b": "FAILED"}

    failed = images["shard-b"].event.dagster_event.event_specific_data
    assert "shard shard-b not published" in failed.description
    assert "4 unexpected of 4 (0.0% as expected)" in failed.description
    assert "expected value_set=[True] for at least 50% of rows" in failed.description
    assert failed.metadata["status_counts"].data == {"http_error": 4}  # the stage's figures come with the failure
    top = failed.metadata["top_errors"].data["HTTP 404"]
    assert top["rows"] == 4 and "/missing/" in top["example_url"]
    assert "| expectation | expected | observed |" in failed.metadata["failing expectations"].value

    # the step fails with that one line, not a stack of framework frames
    run_id = images["shard-b"].run_id
    [failure] = instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)
    error = failure.dagster_event.event_specific_data.error
    assert error.stack == [] and "\n" not in error.message and "not published" in error.message


def test_cli_runs_belong_to_the_ui_code_location(lake_run):
    runs = [r.dagster_run for r in lake_run["instance"].get_run_records()]
    assert {r.job_name for r in runs} == {"shard_pipeline", "lake_pipeline"}  # shards, then what spans them
    assert {r.remote_job_origin.location_name for r in runs} == {"laion_assets"}  # the UI re-executes through it
    assert {r.tags.get("dagster/partition") for r in runs if r.job_name == "shard_pipeline"} == {"shard-a", "shard-b"}


def test_shard_metadata_has_pictures_descriptions_and_table_totals(lake_run):
    instance, lake = lake_run["instance"], lake_run["lake"]
    sizes = {}
    for asset, labels in PICTURES.items():
        md = materialization(instance, asset, "shard-a")
        for label in labels:
            data = base64.b64decode(re.search(r"data:image/webp;base64,([A-Za-z0-9+/=]+)\)", md[label].value).group(1))
            assert Image.open(io.BytesIO(data)).size[0] > 100
            sizes[f"{asset}:{label}"] = len(md[label].value)
    assert max(sizes.values()) < 60_000, sizes  # what each picture adds to the event log
    images = materialization(instance, "images", "shard-a")
    assert "| http_error |" in images["failures"].value and "`http" in images["failures"].value
    for asset in STAGES:
        md = materialization(instance, asset, "shard-a")
        columns = md["dagster/column_schema"].schema.columns
        assert all(c.description for c in columns), [c.name for c in columns if not c.description]
        assert md["dagster/uri"].value.startswith("file://")
        table = pl.read_delta(lake.table_uri(asset))
        assert materialization(instance, asset, None)["dagster/row_count"].value == table.height  # the table, not a shard
        assert md["dagster/partition_row_count"].value == table.filter(pl.col("shard") == "shard-a").height


def test_expected_failure_is_one_line_on_the_step_and_the_check(lake_run, tmp_path):
    instance, lake, defs = lake_run["instance"], lake_run["lake"], lake_run["defs"]
    gone = tmp_path / "shard-gone.parquet"
    pl.DataFrame({"URL": ["http://127.0.0.1/x.jpg"], "TEXT": ["x"]}).write_parquet(gone)
    registry.register(lake, [str(gone)])
    instance.add_dynamic_partitions("shards", ["shard-gone"])
    gone.unlink()
    result = run_shard(instance, defs.resolve_job_def("shard_pipeline"), "shard-gone", [AssetKey("raw_urls")])
    assert not result.success
    [failure] = instance.all_logs(result.run_id, of_type=DagsterEventType.STEP_FAILURE)
    error = failure.dagster_event.event_specific_data.error
    assert error.stack == [] and "laion-assets remove-shard shard-gone" in error.message
    record = checks(instance, "raw_urls")["shard-gone"]
    assert record.status.value == "FAILED"  # with its reason, not "Execution failed"
    assert "not checked: shard file" in record.event.dagster_event.event_specific_data.description


def test_lake_summary_totals_across_shards(lake_run):
    instance, defs = lake_run["instance"], lake_run["defs"]
    job = defs.resolve_implicit_global_asset_job_def()
    for _ in range(2):  # a second point for the subset sizes over time
        assert job.execute_in_process(instance=instance, asset_selection=[AssetKey("lake_summary")]).success
    md = materialization(instance, "lake_summary", None)
    images = pl.read_delta(lake_run["lake"].table_uri("images"))
    assert md["dagster/row_count"].value == images.height
    assert md["rows/images"].value == images.height and md["rows/raw_urls"].value > 0
    assert md["success_rate"].value == pytest.approx((images["status"] == "success").mean(), abs=1e-3)
    assert "| 127.0.0.1 |" in md["top_domains"].value and "| http_error |" in md["images_by_status"].value
    assert set(md["subset_rows"].data) == {"subsets/similar", "subsets/pretty"}
    assert md["subset_sizes"].value.startswith("![subset sizes over time](data:image/webp;base64,")


def test_remove_shard_clears_lake_registry_and_partition(lake_run, capsys):
    instance, lake = lake_run["instance"], lake_run["lake"]
    before = {t: pl.read_delta(lake.table_uri(t)).filter(pl.col("shard") == "shard-a").height for t in lake.tables()}
    assert main(["remove-shard", "shard-b", "--lake", lake.uri]) == 0
    out = capsys.readouterr().out  # (its failed images gate dropped its staged rows already)
    assert out.startswith("shard shard-b removed") and "raw_urls 4" in out
    for table in lake.tables():
        shards = set(pl.read_delta(lake.table_uri(table))["shard"]) if table != registry.TABLE else set(registry.registered(lake))
        assert "shard-b" not in shards, table
    assert "shard-b" not in instance.get_dynamic_partitions("shards")
    assert {t: pl.read_delta(lake.table_uri(t)).filter(pl.col("shard") == "shard-a").height for t in lake.tables()} == before
    assert main(["remove-shard", "shard-b", "--lake", lake.uri]) == 2  # nothing left: says so
    assert "neither registered nor has rows" in capsys.readouterr().err
