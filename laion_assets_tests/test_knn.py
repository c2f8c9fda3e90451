"""kNN index: exact and compressed builds, planted neighbours found first, memory-mapped
search, incremental sync when shards are added, change or leave, and the `search` command."""

from __future__ import annotations

import json

import faiss
import numpy as np
import polars as pl
import pytest

from laion_assets.cli import main
from laion_assets.core.exports.knn import nlist_for, sync_index
from laion_assets.core.exports.search import SubsetIndex
from laion_assets.core.stages import subset_table
from laion_assets_tests.conftest import make_config, write_config
from laion_assets_tests.synthetic import TEXT_QUERY, copy_lake, publish_shard


def test_exact_index_finds_the_planted_neighbour(planted, tmp_path):
    lake = copy_lake(planted, tmp_path / "lake")
    cfg = make_config(knn={"exact_below": 10_000})
    report = sync_index(lake, cfg, "similar")
    assert (report.kind, report.factory, report.rows, report.rebuilt, report.added_shards) == ("flat", "Flat", 198, True, 2)
    assert report.subset_version == lake.table(subset_table("similar")).version()
    idx = SubsetIndex(lake, "similar")
    hits = idx.search(planted["vector"][None, :], 5)[0]
    assert hits[0].uid == planted["vector_uid"] and hits[0].score == pytest.approx(1.0, abs=2e-3)
    assert hits[0].shard == "s0" and hits[0].url.endswith("/s0/9.jpg") and hits[0].caption == "s0 caption 9"
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5] and hits[1].score < 0.5


def test_compressed_index_is_tuned_memory_mapped_and_synced_incrementally(planted, tmp_path):
    lake = copy_lake(planted, tmp_path / "lake")
    cfg = planted["config"]  # exact below 100 vectors: IVF,SQ8 here
    folder = tmp_path / "lake/knn/similar"
    report = sync_index(lake, cfg, "similar")
    assert report.kind == "ivf" and report.factory == f"IVF{nlist_for(198)},SQ8" and report.rows == 198
    assert report.recall_at_10 >= 0.95 and report.nprobe >= 1
    idx = SubsetIndex(lake, "similar")
    assert isinstance(faiss.downcast_InvertedLists(idx.index.invlists), faiss.OnDiskInvertedLists)  # mmapped
    assert idx.search(planted["vector"][None, :], 3)[0][0].uid == planted["vector_uid"]
    ids_before = {p.name: p.stat().st_mtime_ns for p in (folder / "ids").iterdir()}

    # unchanged: nothing rewritten
    again = sync_index(lake, cfg, "similar")
    assert (again.version, again.rebuilt, again.unchanged_shards) == (0, False, 2)

    # a new shard is added to the index without retraining or re-reading the others
    publish_shard(lake, cfg, "s2", 40, 3, 512)
    added = sync_index(lake, cfg, "similar")
    assert (added.version, added.rebuilt, added.added_shards, added.unchanged_shards, added.rows) == (1, False, 1, 2, 237)
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "ids").iterdir() if not p.name.startswith("s2")} == ids_before

    # a blocklist pass drops the planted row of s0 (new subset version): only s0 is replaced
    table = subset_table("similar")
    rows = lake.read_shard(table, "s0")
    lake.publish_shard(table, "s0", rows.filter(pl.col("uid") != planted["vector_uid"]).drop("shard"))
    replaced = sync_index(lake, cfg, "similar")
    assert (replaced.replaced_shards, replaced.unchanged_shards, replaced.rows) == (1, 2, 236)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["subset_version"] == lake.table(table).version() and manifest["version"] == 2
    hits = SubsetIndex(lake, "similar").search(planted["vector"][None, :], 10)[0]
    assert planted["vector_uid"] not in [h.uid for h in hits]

    # a shard that leaves the subset leaves the index; files of older versions are collected
    lake.delete_shard(table, "s2")
    removed = sync_index(lake, cfg, "similar")
    assert (removed.removed_shards, removed.rows) == (1, 197)
    hits = SubsetIndex(lake, "similar").search(np.ones((1, 512), np.float32) / np.sqrt(512), 197)[0]
    assert {h.shard for h in hits} == {"s0", "s1"} and len(hits) >= 150
    assert sorted(p.name for p in folder.glob("index-*")) == ["index-000002.faiss", "index-000003.faiss"]


def test_index_type_follows_the_size(planted, tmp_path):
    lake = copy_lake(planted, tmp_path / "lake")
    assert sync_index(lake, make_config(knn={"exact_below": 1000}), "similar").kind == "flat"
    grown = sync_index(lake, make_config(knn={"exact_below": 150}), "similar")
    assert grown.kind == "ivf" and grown.rebuilt and grown.version == 1


def test_search_command_prints_the_planted_text_neighbour_first(planted, tmp_path, capsys):
    lake = copy_lake(planted, tmp_path / "lake")
    sync_index(lake, planted["config"], "similar")
    config = write_config(tmp_path / "config.yaml", planted["config"])
    args = ["--lake", str(tmp_path / "lake"), "--config", str(config)]
    assert main(["search", TEXT_QUERY, "--subset", "similar", "-k", "3", *args]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["rank", "score", "uid"]
    rank, score, uid, url, *caption = lines[1].split()
    assert (rank, int(uid), " ".join(caption)) == ("1", planted["text_uid"], planted["text_caption"])
    assert float(score) == pytest.approx(1.0, abs=2e-3) and url.startswith("http://127.0.0.1:1/s0/")

    # the index names its query model: no config, and the first subset with an index by default
    assert main(["search", TEXT_QUERY, "-k", "3", "--lake", str(tmp_path / "lake")]) == 0
    assert capsys.readouterr().out == out

    assert main(["search", TEXT_QUERY, "--subset", "nope", *args]) == 2
    assert "no kNN index" in capsys.readouterr().err
    assert main(["search", *args]) == 2
    assert "give a text query, an image, or both" in capsys.readouterr().err


def test_an_index_from_before_manifests_named_their_model(planted, tmp_path, capsys):
    """Searchable with its config; without one, a one-line error saying what to do; the next
    sync records the model without re-reading a shard."""
    lake = copy_lake(planted, tmp_path / "lake")
    sync_index(lake, planted["config"], "similar")
    manifest_path = tmp_path / "lake/knn/similar/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["query_model"] == {"model": "tiny", "pretrained": "openai", "checkpoint": None}
    del manifest["query_model"]
    manifest_path.write_text(json.dumps(manifest))
    search = ["search", TEXT_QUERY, "-k", "3", "--lake", str(tmp_path / "lake")]

    assert main(search) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: the similar index does not name its query model (it predates that): give the config it was built "
        "with (--config), or materialize knn_similar again to record it"
    )
    assert main([*search, "--config", str(write_config(tmp_path / "config.yaml", planted["config"]))]) == 0
    with_config = capsys.readouterr().out
    assert with_config.splitlines()[1].split()[2] == str(planted["text_uid"])

    ids = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "lake/knn/similar/ids").iterdir()}
    report = sync_index(lake, planted["config"], "similar")
    assert (report.version, report.rebuilt, report.unchanged_shards) == (1, False, 2)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "lake/knn/similar/ids").iterdir()} == ids
    assert main(search) == 0
    assert capsys.readouterr().out == with_config
