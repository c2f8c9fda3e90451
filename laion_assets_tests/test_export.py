"""Webdataset export in the `shards` layout (a folder per shard, uid keys): tar contents,
deterministic bytes, incremental re-export. img2dataset's layout: test_export_img2dataset.py."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from laion_assets.core.exports.webdataset import export_shard, sample_key, train_shards
from laion_assets.core.lake.delta import Lake
from laion_assets.core.stages import IMAGES, subset_table
from laion_assets_tests.conftest import make_config
from laion_assets_tests.synthetic import copy_lake, publish_shard


def members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def folder_state(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_tar_layout_matches_img2dataset_and_the_subset(planted, tmp_path):
    lake = copy_lake(planted, tmp_path / "lake")
    cfg = make_config(export={"samples_per_tar": 40, "layout": "shards"})
    report = export_shard(lake, cfg, "similar", "s0")

    subset = pl.read_delta(lake.table_uri(subset_table("similar"))).filter(pl.col("shard") == "s0")
    assert report.samples == subset.height == 119 and report.rewritten and report.missing_images == 0
    folder = tmp_path / "lake/webdataset/similar/s0"
    assert sorted(p.name for p in folder.iterdir()) == [
        "00000.parquet", "00000.tar", "00001.parquet", "00001.tar", "00002.parquet", "00002.tar", "stats.json",
    ]
    images = dict(pl.read_delta(lake.table_uri(IMAGES)).select("uid", "image").iter_rows())
    by_uid = {row["uid"]: row for row in subset.iter_rows(named=True)}
    keys, counts = [], []
    for t in range(3):
        files = members(folder / f"{t:05d}.tar")
        tar_keys = list(dict.fromkeys(name.split(".")[0] for name in files))
        meta = pq.read_table(folder / f"{t:05d}.parquet").to_pylist()
        assert [m["key"] for m in meta] == tar_keys  # one parquet row per sample, same order
        for key, row in zip(tar_keys, meta):
            sample = json.loads(files[f"{key}.json"])
            source = by_uid[sample["uid"]]
            assert key == sample_key(sample["uid"]) == row["key"]
            ext = "png" if images[sample["uid"]][:4] == b"\x89PNG" else "jpg"  # the stored format
            assert files[f"{key}.{ext}"] == images[sample["uid"]]
            assert files[f"{key}.txt"].decode() == (source["caption"] or "")
            for column in ("url", "caption", "similarity", "aesthetic", "punsafe", "width", "height", "original_width", "sha256", "LICENSE", "source_LANGUAGE", "language", "source_similarity", "recipe_id"):
                expected = pytest.approx(source[column], rel=1e-6) if isinstance(source[column], float) else source[column]
                assert sample[column] == expected and row[column] == expected, column
            assert sample["shard"] == "s0"
        keys += tar_keys
        counts.append(len(tar_keys))
    assert counts == [40, 40, 39]
    assert keys == sorted(keys) and sorted(keys) == sorted(sample_key(u) for u in by_uid)
    assert any(name.endswith(".png") for name in members(folder / "00000.tar")) or any(
        name.endswith(".png") for t in (1, 2) for name in members(folder / f"{t:05d}.tar")
    )
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["samples"] == 119 and [t["samples"] for t in stats["tars"]] == [40, 40, 39]
    assert stats["formats"] == {"jpg": 118, "png": 1} and stats["subset_version"] == lake.table(subset_table("similar")).version()
    urls, samples = train_shards(lake, "similar")
    assert samples == 119 and [u.rsplit("/", 2)[1:] for u in urls] == [["s0", f"{t:05d}.tar"] for t in range(3)]


def test_same_rows_give_the_same_bytes(planted, tmp_path):
    """A lake built again from the same rows (other Delta files, other order of publishing)
    exports byte-identical tars and parquet files."""
    cfg = make_config(export={"samples_per_tar": 50, "layout": "shards"})
    first = copy_lake(planted, tmp_path / "a")
    export_shard(first, cfg, "similar", "s1")
    second = Lake(tmp_path / "b")
    publish_shard(second, cfg, "s1", 80, 2, 512, planted={8: _vector(first, "s1", planted["image_uid"])})
    export_shard(second, cfg, "similar", "s1")
    a, b = tmp_path / "a/webdataset/similar/s1", tmp_path / "b/webdataset/similar/s1"
    names = sorted(p.name for p in a.iterdir() if p.name != "stats.json")
    assert names == ["00000.parquet", "00000.tar", "00001.parquet", "00001.tar"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _vector(lake: Lake, shard: str, uid: int):
    from laion_assets.core.embeddings import vectors

    emb = lake.read_shard("embeddings/tiny", shard).filter(pl.col("uid") == uid)
    return vectors.from_column(emb["image_embedding"])[0]


def test_reexport_rewrites_only_changed_shards(planted, tmp_path):
    lake = copy_lake(planted, tmp_path / "lake")
    cfg = make_config(export={"samples_per_tar": 50, "layout": "shards"})
    for shard in ("s0", "s1"):
        assert export_shard(lake, cfg, "similar", shard).rewritten
    s0, s1 = tmp_path / "lake/webdataset/similar/s0", tmp_path / "lake/webdataset/similar/s1"
    before = {s: folder_state(f) for s, f in (("s0", s0), ("s1", s1))}

    # nothing changed: nothing is written
    for shard in ("s0", "s1"):
        assert not export_shard(lake, cfg, "similar", shard).rewritten
    assert {s: folder_state(f) for s, f in (("s0", s0), ("s1", s1))} == before

    # a blocklist pass drops a row of s0 in a new Delta version of the subset: s0 is rewritten
    table = subset_table("similar")
    rows = lake.read_shard(table, "s0")
    blocked = rows["uid"][3]
    lake.publish_shard(table, "s0", rows.filter(pl.col("uid") != blocked).drop("shard"))
    report = export_shard(lake, cfg, "similar", "s0")
    assert report.rewritten and report.samples == rows.height - 1
    assert report.subset_version == lake.table(table).version()
    assert not export_shard(lake, cfg, "similar", "s1").rewritten and folder_state(s1) == before["s1"]
    exported = {name.split(".")[0] for t in ("00000", "00001", "00002") if (s0 / f"{t}.tar").exists() for name in members(s0 / f"{t}.tar")}
    assert sample_key(blocked) not in exported and len(exported) == rows.height - 1

    # fewer, bigger tars: the stale ones go
    export_shard(lake, make_config(export={"samples_per_tar": 1000, "layout": "shards"}), "similar", "s0")
    assert sorted(p.name for p in s0.iterdir()) == ["00000.parquet", "00000.tar", "stats.json"]


def test_missing_subset_is_a_clear_error(tmp_path):
    from laion_assets.core.lake.errors import LaionAssetsError

    with pytest.raises(LaionAssetsError, match="materialize subsets/similar first"):
        export_shard(Lake(tmp_path / "lake"), make_config(), "similar", "s0")


def test_json_is_valid_for_every_sample(planted, tmp_path):
    lake = copy_lake(planted, tmp_path / "lake")
    export_shard(lake, make_config(export={"layout": "shards"}), "similar", "s1")
    files = members(tmp_path / "lake/webdataset/similar/s1/00000.tar")
    samples = [json.loads(v) for k, v in files.items() if k.endswith(".json")]
    assert len(samples) == 79 and all(isinstance(s["uid"], int) for s in samples)
    assert io.BytesIO(files[next(k for k in files if k.endswith(".jpg"))]).read(3) == b"\xff\xd8\xff"
