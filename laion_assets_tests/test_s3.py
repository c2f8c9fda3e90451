"""The lake and the inputs on S3: a moto S3 server on 127.0.0.1 (a separate process: deltalake's
requests hold the GIL, so an in-process server thread could not answer them)."""

import os

import polars as pl
import pytest
from dagster import instance_for_test

from laion_assets.cli.pipeline import run_pipeline
from laion_assets.core.lake.delta import Lake
from laion_assets_tests.conftest import make_config, write_config


@pytest.fixture
def s3(moto_s3):
    import boto3

    return boto3.client("s3", endpoint_url=moto_s3.endpoint)


@pytest.mark.slow
def test_pipeline_with_lake_and_inputs_on_s3(s3, shard_rows, tmp_path):
    local = tmp_path / "part-s3.parquet"
    shard_rows.write_parquet(local)
    s3.upload_file(str(local), "laion", "input/part-s3.parquet")
    config = write_config(tmp_path / "c.yaml", make_config())
    with instance_for_test() as instance:
        summary = run_pipeline(["s3://laion/input"], "s3://laion/lake", str(config), "raw_urls,images,embeddings,scores", instance=instance)
    assert [line.status for line in summary.lines] == ["materialized"] * 4, summary.lines
    lake = Lake("s3://laion/lake")
    assert [t for t in lake.tables() if not t.startswith("_staging")] == ["_shards", "embeddings/tiny", "images", "raw_urls", "raw_urls_rejected", "scores"]
    assert lake.shard_row_count("raw_urls_rejected", "part-s3") == 2  # the rows without a fetchable URL
    images = pl.read_delta("s3://laion/lake/images")
    assert images.height == lake.shard_row_count("raw_urls", "part-s3")
    assert images.filter(pl.col("status") == "success")["image"].null_count() == 0
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
