"""Exports and the kNN index on an S3 lake (moto server on 127.0.0.1): tars, parquet, stats and
the index are written through the lake's filesystem (both export layouts), and search works from
a local copy."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from laion_assets.core.exports.knn import sync_index
from laion_assets.core.exports.search import SubsetIndex
from laion_assets.core.exports.webdataset import export_shard, train_data, train_shards
from laion_assets.core.lake.delta import Lake
from laion_assets_tests.conftest import make_config
from laion_assets_tests.synthetic import publish_shard, unit
from laion_assets_tests.test_s3 import s3  # noqa: F401 (fixture: moto server process)


@pytest.mark.slow
def test_export_and_index_on_s3(s3):  # noqa: F811
    lake = Lake("s3://laion/lake")
    cfg = make_config(export={"samples_per_tar": 20, "layout": "shards"}, knn={"exact_below": 50})
    vector = unit(np.random.default_rng(7), 1, 512)[0]
    publish_shard(lake, cfg, "s0", 60, 1, 512, planted={4: vector})

    report = export_shard(lake, cfg, "similar", "s0")
    assert report.samples == 59 and report.location == "s3://laion/lake/webdataset/similar/s0"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="laion", Prefix="lake/webdataset/similar/s0/")["Contents"])
    assert keys == [f"lake/webdataset/similar/s0/{n}" for n in (
        "00000.parquet", "00000.tar", "00001.parquet", "00001.tar", "00002.parquet", "00002.tar", "stats.json",
    )]
    tar = tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket="laion", Key="lake/webdataset/similar/s0/00000.tar")["Body"].read()))
    assert len(tar.getnames()) == 60  # 20 samples x (image, caption, metadata)
    assert not export_shard(lake, cfg, "similar", "s0").rewritten
    urls, samples = train_shards(lake, "similar")
    assert samples == 59 and urls[0] == "s3://laion/lake/webdataset/similar/s0/00000.tar"

    # img2dataset's layout replaces it: one folder, the shard folder's files gone
    flat = make_config(export={"samples_per_tar": 20}, knn={"exact_below": 50})
    assert export_shard(lake, flat, "similar", "s0").rewritten
    listed = s3.list_objects_v2(Bucket="laion", Prefix="lake/webdataset/similar/")["Contents"]
    keys = sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))  # pyarrow leaves folder markers
    assert keys == sorted(
        [f"lake/webdataset/similar/{t:05d}{suffix}" for t in range(3) for suffix in (".parquet", ".tar", "_stats.json")]
        + ["lake/webdataset/similar/_shards/s0.json", "lake/webdataset/similar/sizes.json"]
    )
    assert train_data(lake, "similar") == ("s3://laion/lake/webdataset/similar/{00000..00002}.tar", [20, 20, 19])
    assert not export_shard(lake, flat, "similar", "s0").rewritten

    index = sync_index(lake, cfg, "similar")
    assert index.kind == "ivf" and index.rows == 59
    hits = SubsetIndex(lake, "similar").search(vector[None, :], 3)[0]
    assert hits[0].url.endswith("/s0/4.jpg") and hits[0].score == pytest.approx(1.0, abs=2e-3)
