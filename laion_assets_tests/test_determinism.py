"""The same shard, config and code give the same data on every run: two uninterrupted runs of
a real shard (downloads from 127.0.0.1 finishing in another order, the tiny CLIP and watermark
towers, the heads) hold equal values in every table, row by row, and byte-identical tars.

What may differ, by design: the order rows sit in the images, embeddings and watermark files
(the order downloads finished in), Delta's file names, `images.duration_s` (how long a fetch
took), and `stats.json`'s duration and fingerprint (which names those files)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from dagster import instance_for_test

from laion_assets.cli.pipeline import run_pipeline
from laion_assets.core.exports.config import ExportConfig, KnnConfig
from laion_assets.core.lake.delta import Lake
from laion_assets.core.scores.config import WatermarkConfig
from laion_assets_tests.conftest import make_config, write_config

TIMINGS = {"images": ["duration_s"]}


@pytest.mark.slow
def test_two_runs_of_a_shard_give_the_same_tables_and_tars(tmp_path, shard_rows):
    inputs = tmp_path / "input"
    inputs.mkdir()
    shard_rows.write_parquet(inputs / "shard-a.parquet")
    cfg = make_config(export=ExportConfig(samples_per_tar=8), knn=KnnConfig(), watermark=WatermarkConfig(model="tiny"))
    config = write_config(tmp_path / "config.yaml", cfg)
    for name in ("one", "two"):
        with instance_for_test() as instance:
            summary = run_pipeline([str(inputs)], str(tmp_path / name), str(config), None, instance=instance)
        assert summary.ok, summary.lines

    one, two = Lake(tmp_path / "one"), Lake(tmp_path / "two")
    tables = [t for t in one.tables() if not t.startswith("_")]
    assert {"embeddings/tiny", "watermark", "scores", "subsets/similar", "curation/duplicates"} <= set(tables)
    for table in tables:
        a, b = (pl.read_delta(lk.table_uri(table)).drop(TIMINGS.get(table, [])) for lk in (one, two))
        key = [c for c in ("shard", "uid", "source_row", "bucket", "kind", "key") if c in a.columns]
        a, b = a.sort(key), b.sort(key)
        assert a.columns == b.columns and a.height == b.height, table
        for column in a.columns:  # exactly: float16 cells and float32 scores bit for bit
            assert a[column].equals(b[column]), f"{table}.{column} differs between two runs"

    tars = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "webdataset").rglob("*") if p.suffix in (".tar", ".parquet"))
    assert len(tars) > 4
    for name in tars:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), f"{name} differs between two runs"
    assert not [p for p in (tmp_path / "two" / "webdataset").rglob("*") if p.suffix == ".tar" and Path(p.relative_to(tmp_path / "two")) not in tars]
