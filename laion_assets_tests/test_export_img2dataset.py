"""The webdataset export in img2dataset's output layout, read with img2dataset's conventions: one
brace pattern over every tar of the subset, the `webdataset` library reading every sample,
per-tar parquet and stats files with the fields img2dataset 1.47.0 itself writes (compared with
a real img2dataset run), sizes.json read by open_clip; renumbering when a shard's tar count
changes, incremental and deterministic."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_assets.core.exports.webdataset import export_shard, train_data, train_shards
from laion_assets.core.stages import IMAGES, subset_table
from laion_assets_tests.conftest import make_config
from laion_assets_tests.synthetic import copy_lake, image_bytes

I2D_STATS = {"count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time", "end_time", "status_dict"}


def read_all(pattern: str) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(pattern, shardshuffle=False))


def folder_state(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def exported(planted, tmp_path):
    """Both shards of `similar` exported 40 a tar; one subset row of s1 has no stored image."""
    lake = copy_lake(planted, tmp_path / "lake")
    images = lake.read_shard(IMAGES, "s1").drop("shard")
    lost = lake.read_shard(subset_table("similar"), "s1")["uid"].sort()[50]  # position 50: the second tar of s1
    lake.publish_shard(IMAGES, "s1", images.with_columns(image=pl.when(pl.col("uid") == lost).then(None).otherwise(pl.col("image"))))
    cfg = make_config(export={"samples_per_tar": 40})
    reports = [export_shard(lake, cfg, "similar", s) for s in ("s0", "s1")]
    return lake, cfg, reports, lost


def test_one_brace_pattern_reads_every_sample(exported, tmp_path):
    from open_clip_train.data import get_dataset_size

    lake, _, reports, lost = exported
    folder = tmp_path / "lake/webdataset/similar"
    assert [r.tars for r in reports] == [["00000.tar", "00001.tar", "00002.tar"], ["00003.tar", "00004.tar"]]
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(
        f"{t:05d}{suffix}" for t in range(5) for suffix in (".tar", ".parquet", "_stats.json")
    ) + ["sizes.json"]
    pattern, sizes = train_data(lake, "similar")
    assert pattern == f"{folder}/{{00000..00004}}.tar" and sizes == [40, 40, 39, 40, 38]
    assert json.loads((folder / "sizes.json").read_text()) == {f"{t:05d}.tar": n for t, n in enumerate(sizes)}
    assert get_dataset_size(pattern) == (197, 5)  # open_clip reads sizes.json

    subset = pl.read_delta(lake.table_uri(subset_table("similar")))
    stored = dict(pl.read_delta(lake.table_uri(IMAGES)).select("uid", "image").iter_rows())
    samples = read_all(pattern)
    assert len(samples) == 197
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 197 and all(len(k) == 7 and k.isdigit() for k in keys)  # 5 digits of tar + 2 of position
    by_uid = {row["uid"]: row for row in subset.iter_rows(named=True)}
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and s["__url__"].endswith(f"/{meta['key'][:5]}.tar")
        assert meta["status"] == "success" and meta["error_message"] is None and meta["exif"] is None
        row = by_uid[meta["uid"]]
        assert (meta["url"], meta["caption"], meta["sha256"], meta["width"], meta["original_height"]) == (
            row["url"], row["caption"], row["sha256"], row["width"], row["original_height"])
        assert s.get("jpg", s.get("png")) == stored[meta["uid"]] and s["txt"].decode() == (row["caption"] or "")
    assert {json.loads(s["json"])["uid"] for s in samples} == set(by_uid) - {lost}

    # each tar's parquet has every subset row of its key range, with its status; stats count them
    for t in range(5):
        rows = pq.read_table(folder / f"{t:05d}.parquet").to_pylist()
        in_tar = [json.loads(s["json"]) for s in samples if s["__key__"][:5] == f"{t:05d}"]
        assert [r["key"] for r in rows if r["status"] == "success"] == [m["key"] for m in in_tar]
        stats = json.loads((folder / f"{t:05d}_stats.json").read_text())
        assert set(stats) == I2D_STATS and stats["count"] == len(rows) and stats["successes"] == len(in_tar)
    failed = [r for r in pq.read_table(folder / "00004.parquet").to_pylist() if r["status"] != "success"]
    assert [(r["uid"], r["status"]) for r in failed] == [(lost, "failed_to_download")] and failed[0]["error_message"]
    assert json.loads((folder / "00004_stats.json").read_text())["failed_to_download"] == 1


def test_renumbered_incremental_and_deterministic(exported, planted, tmp_path):
    """A shard losing a tar moves the tars after it (rewritten by the same export); nothing
    changes on a rerun; the same rows give the same bytes whatever order shards are exported in."""
    lake, cfg, _, _ = exported
    folder = tmp_path / "lake/webdataset/similar"
    table = subset_table("similar")
    rows = lake.read_shard(table, "s0")
    lake.publish_shard(table, "s0", rows.sort("uid").head(79).drop("shard"))  # 119 -> 79 rows: 3 -> 2 tars
    report = export_shard(lake, cfg, "similar", "s0")
    assert report.rewritten and report.tars == ["00000.tar", "00001.tar"] and report.moved_shards == 1
    pattern, sizes = train_data(lake, "similar")
    assert pattern.endswith("{00000..00003}.tar") and sizes == [40, 39, 40, 38]
    assert not (folder / "00004.tar").exists() and not (folder / "00004_stats.json").exists()
    assert len(read_all(pattern)) == 157
    before = folder_state(folder)
    for s in ("s1", "s0"):
        assert not export_shard(lake, cfg, "similar", s).rewritten
    assert {k: v for k, v in folder_state(folder).items() if k != "sizes.json"} == {k: v for k, v in before.items() if k != "sizes.json"}

    # the same rows exported in the other order: byte-identical tars and parquet files
    other = copy_lake(planted, tmp_path / "other")
    other.publish_shard(IMAGES, "s1", lake.read_shard(IMAGES, "s1").drop("shard"))
    other.publish_shard(table, "s0", lake.read_shard(table, "s0").drop("shard"))
    for s in ("s1", "s0"):
        export_shard(other, cfg, "similar", s)
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".tar", ".parquet"))
    assert len(names) == 8
    for name in names:
        assert (folder / name).read_bytes() == (tmp_path / "other/webdataset/similar" / name).read_bytes(), name
    urls, samples = train_shards(other, "similar")
    assert samples == 157 and [u.rsplit("/", 1)[1] for u in urls] == [f"{t:05d}.tar" for t in range(4)]


def test_removed_shard_leaves_no_trainable_tars(exported, tmp_path):
    """Removing a shard takes sizes.json away (nothing trains on its tars); the next export of
    the subset renumbers the rest."""
    from laion_assets.core.ingest import registry

    lake, cfg, _, _ = exported
    assert registry.remove_shard(lake, "s0")["webdataset/similar/_shards/s0.json"] == 1
    assert train_data(lake, "similar") == ("", [])
    report = export_shard(lake, cfg, "similar", "s1")
    assert report.tars == ["00000.tar", "00001.tar"] and report.rewritten
    pattern, sizes = train_data(lake, "similar")
    assert pattern.endswith("/{00000..00001}.tar") and sizes == [40, 38] and len(read_all(pattern)) == 78
    assert sorted(p.name for p in (tmp_path / "lake/webdataset/similar").glob("*.tar")) == ["00000.tar", "00001.tar"]


@pytest.mark.slow
def test_fields_match_what_img2dataset_writes(exported, tmp_path):
    """img2dataset 1.47.0 itself downloads four URLs (one missing) from a server on 127.0.0.1
    into webdataset: every field of its per-sample json and parquet (same arrow types), its
    stats fields and its key width are in our export."""
    site = tmp_path / "site"
    site.mkdir()
    for i in range(3):
        (site / f"{i}.jpg").write_bytes(image_bytes(i))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    pq.write_table(pa.table({"url": [f"{base}/{i}.jpg" for i in range(3)] + [f"{base}/missing.jpg"], "caption": list("abcd")}), tmp_path / "in.parquet")
    img2dataset = Path(sys.executable).with_name("img2dataset")
    try:
        subprocess.run([
            str(img2dataset), "--url_list", str(tmp_path / "in.parquet"), "--input_format", "parquet", "--url_col", "url",
            "--caption_col", "caption", "--output_folder", str(tmp_path / "i2d"), "--output_format", "webdataset",
            "--processes_count", "1", "--thread_count", "2", "--number_sample_per_shard", "40", "--image_size", "32",
        ], check=True, capture_output=True, timeout=600, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    finally:
        server.shutdown()
    theirs, ours = tmp_path / "i2d", tmp_path / "lake/webdataset/similar"
    their_parquet, our_parquet = pq.read_schema(theirs / "00000.parquet"), pq.read_schema(ours / "00004.parquet")
    assert {f.name: f.type for f in their_parquet} == {f.name: our_parquet.field(f.name).type for f in their_parquet}
    their_rows, our_rows = pq.read_table(theirs / "00000.parquet").to_pylist(), pq.read_table(ours / "00004.parquet").to_pylist()
    assert {r["status"] for r in their_rows} == {r["status"] for r in our_rows} == {"success", "failed_to_download"}
    assert {len(r["key"]) for r in their_rows} == {len(r["key"]) for r in our_rows} == {7}
    their_stats, our_stats = (json.loads((f / "00000_stats.json").read_text()) for f in (theirs, ours))
    assert set(their_stats) == set(our_stats) == I2D_STATS
    with tarfile.open(theirs / "00000.tar") as tar:
        their_json = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    with tarfile.open(ours / "00000.tar") as tar:
        our_json = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    assert set(their_json) <= set(our_json) and {type(their_json[k]) for k in ("width", "key", "status")} == {type(our_json[k]) for k in ("width", "key", "status")}
