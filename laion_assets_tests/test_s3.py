"""The lake and the inputs on S3: a moto S3 server on 127.0.0.1 (a separate process: deltalake's
requests hold the GIL, so an in-process server thread could not answer them)."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest
from dagster import instance_for_test

from laion_assets.cli import run_pipeline
from laion_assets.core.lake import Lake
from laion_assets_tests.conftest import make_config, write_config


@pytest.fixture
def s3(monkeypatch, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true",
    }.items():
        monkeypatch.setenv(key, value)
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="laion")
    yield client
    proc.kill()
    proc.wait()


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
