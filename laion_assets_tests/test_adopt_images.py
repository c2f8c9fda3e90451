"""Adopting an img2dataset download: img2dataset itself downloads from a counting server on
127.0.0.1 in each of its output formats, the lake adopts the folder, and the server sees no
request; every input row ends with the outcome img2dataset recorded and the very bytes it
stored, and the later stages run on the adopted shards (the slow end-to-end test)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from laion_assets.core import stages
from laion_assets.core.images.download import I2D_STATUS
from laion_assets.core.images import adopt as images_adopt
from laion_assets.core.ingest import registry
from laion_assets.core.ingest.img2dataset import PREFIX, I2dShard, register_folder
from laion_assets.core.ingest.reader import laion_uid
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.stages import fingerprints
from laion_assets_tests.conftest import make_config, write_config
from laion_assets_tests.faultsite import FaultServer

pytestmark = pytest.mark.slow  # img2dataset imports torch in each of its processes: ~30 s a download

FORMATS = ("files", "webdataset", "parquet")
I2D_SIZE = 64  # img2dataset's image_size; the lake's config says 256: kept as stored


@pytest.fixture(scope="module")
def i2d_site(tmp_path_factory):
    """A counting server with photos, a tiny image, a text file; and the URL list."""
    root = tmp_path_factory.mktemp("i2d-site")
    rng = np.random.default_rng(7)
    names = []
    for i in range(8):
        size = (int(rng.integers(90, 200)), int(rng.integers(90, 200)))
        px = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        name = f"photo{i}.{'png' if i == 3 else 'jpg'}"
        Image.fromarray(px).save(root / name)
        names.append(name)
    Image.new("RGB", (20, 20)).save(root / "tiny.jpg")
    (root / "text.jpg").write_text("not an image at all")
    server = FaultServer(root)
    base = server.base_url
    urls = [f"{base}/img/{n}" for n in names] + [
        f"{base}/img/tiny.jpg", f"{base}/img/text.jpg", f"{base}/status/404/a", f"{base}/status/500/b",
        f"{base}/robots/noai/photo0.jpg",
    ]
    rows = pl.DataFrame({
        "URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))],
        "similarity": [round(0.1 + i / 100, 3) for i in range(len(urls))], "LICENSE": [f"lic{i}" for i in range(len(urls))],
    })
    rows = pl.concat([rows.head(2), rows.head(1), rows.slice(2)])  # row 2 repeats row 0: kept out as a duplicate
    url_list = root.parent / "i2d-urls.parquet"
    rows.write_parquet(url_list)
    yield server.site, url_list, rows
    server.close()


def start_img2dataset(url_list: Path, out: Path, output_format: str) -> subprocess.Popen:
    """img2dataset itself (its CLI, the venv's), 8 samples per shard; albumentations, which it
    imports, is told not to look for updates online."""
    cli = Path(sys.executable).parent / "img2dataset"
    return subprocess.Popen([
        str(cli), "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "URL", "--caption_col", "TEXT",
        "--save_additional_columns", '["similarity","LICENSE"]', "--output_folder", str(out), "--output_format", output_format,
        "--processes_count", "1", "--thread_count", "4", "--number_sample_per_shard", "8", "--image_size", str(I2D_SIZE),
        "--resize_mode", "keep_ratio", "--min_image_size", "40", "--timeout", "5", "--retries", "0",
    ], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})


@pytest.fixture(scope="module")
def i2d_folders(i2d_site, tmp_path_factory):
    """One img2dataset download per output format, run side by side (each imports torch)."""
    _, url_list, _ = i2d_site
    root = tmp_path_factory.mktemp("i2d-out")
    folders = {fmt: root / f"laion-{fmt}" for fmt in FORMATS}
    runs = {fmt: start_img2dataset(url_list, folders[fmt], fmt) for fmt in FORMATS}
    for fmt, proc in runs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out.decode()[-2000:]
    return folders


def i2d_records(folder: Path) -> pl.DataFrame:
    """img2dataset's per-sample records of every shard (without stored bytes)."""
    frames = [pl.read_parquet(p).drop(["jpg", "png", "webp"], strict=False) for p in sorted(folder.glob("*.parquet"))]
    return pl.concat(frames)


def stored_by_peer(folder: Path, fmt: str) -> dict[str, bytes]:
    """key -> the bytes img2dataset stored, read the way its users read them (webdataset's
    own reader for the tars)."""
    if fmt == "webdataset":
        import webdataset as wds

        urls = [str(p) for p in sorted(folder.glob("*.tar"))]
        return {s["__key__"]: s["jpg"] for s in wds.WebDataset(urls, shardshuffle=False)}
    if fmt == "files":
        return {p.stem: p.read_bytes() for p in folder.glob("*/*.jpg")}
    return {k: b for p in sorted(folder.glob("*.parquet")) for k, b in pl.read_parquet(p).select("key", "jpg").iter_rows() if b is not None}


def adopt(lake: Lake, cfg, folder: Path) -> list[str]:
    keys, _ = register_folder(lake, str(folder))
    for key in keys:
        stages.run_raw_urls(lake, cfg, key)
        stages.run_images(lake, cfg, key)
    return keys


@pytest.mark.parametrize("fmt", FORMATS)
def test_adopting_each_output_format_makes_no_request_and_keeps_every_outcome(fmt, i2d_site, i2d_folders, tmp_path):
    site, _, rows = i2d_site
    folder = i2d_folders[fmt]
    cfg = make_config(download={"min_success_rate": 0.0})
    lake = Lake(tmp_path / "lake")
    hits = sum(site.hits.values())
    keys = adopt(lake, cfg, folder)
    assert keys == [f"laion-{fmt}-00000", f"laion-{fmt}-00001"]
    assert sum(site.hits.values()) == hits  # not one request

    records = i2d_records(folder)
    assert records.height == rows.height == 14
    raw = pl.read_delta(lake.table_uri("raw_urls"))
    rejected = pl.read_delta(lake.table_uri("raw_urls_rejected"))
    images = pl.read_delta(lake.table_uri("images"))
    assert raw.height + rejected.height == records.height and images.height == raw.height
    stored = stored_by_peer(folder, fmt)
    assert len(stored) == records.filter(pl.col("status") == "success").height == 9  # 8 photos and the repeat
    kept = raw.join(images, on="uid", suffix="_img")
    for rec in records.iter_rows(named=True):
        uid = laion_uid(rec["url"], rec["caption"])
        row = kept.filter(pl.col("img2dataset_key") == rec["key"])
        if row.height == 0:  # the repeated row: kept out, with img2dataset's outcome beside it
            out = rejected.filter(pl.col("img2dataset_key") == rec["key"]).row(0, named=True)
            assert out["reason"] == "duplicate_uid" and out["uid"] == uid and out["img2dataset_status"] == rec["status"]
            continue
        got = row.row(0, named=True)
        assert got["uid"] == uid and got["url"] == rec["url"] and got["caption"] == rec["caption"]
        assert (got["similarity"], got["LICENSE"]) == (rec["similarity"], rec["LICENSE"])  # extra columns kept
        assert (got["img2dataset_status"], got["img2dataset_error_message"]) == (rec["status"], rec["error_message"])
        assert I2D_STATUS[got["status"]] == rec["status"] and got["error"] == rec["error_message"]
        assert (got["original_width"], got["original_height"]) == (rec["original_width"], rec["original_height"])
        if rec["status"] == "success":
            assert got["image"] == stored[rec["key"]]  # the very bytes img2dataset stored
            assert got["sha256"] == rec["sha256"] and (got["width"], got["height"]) == (rec["width"], rec["height"])
            assert Image.open(io.BytesIO(got["image"])).size == (rec["width"], rec["height"])
            assert max(got["width"], got["height"]) >= I2D_SIZE > min(got["width"], got["height"]) - 1
            assert got["phash"] and got["image_sha256"]
        else:
            assert got["image"] is None
    by_url = {u.rsplit("/", 2)[-2] + "/" + u.rsplit("/", 1)[-1]: s for u, s, h in kept.select("url", "status", "http_status").iter_rows()}
    assert by_url["img/tiny.jpg"] == "too_small" and by_url["img/text.jpg"] == "failed_decode"
    assert by_url["404/a"] == "http_error" and by_url["500/b"] == "http_error" and by_url["noai/photo0.jpg"] == "opted_out"
    assert sorted(kept.filter(pl.col("status") == "http_error")["http_status"].to_list()) == [404, 500]


def test_adopted_images_stay_as_stored_and_are_never_fetched_again(i2d_site, i2d_folders, tmp_path):
    site, _, _ = i2d_site
    lake = Lake(tmp_path / "lake")
    cfg = make_config(download={"min_success_rate": 0.0})
    hits = sum(site.hits.values())
    key = adopt(lake, cfg, i2d_folders["webdataset"])[0]
    before = pl.read_delta(lake.table_uri("images")).filter(pl.col("shard") == key).sort("uid")
    out = stages.run_images(lake, cfg, key)  # the images stage again, e.g. from the UI: read, not fetched
    assert out.stats["requests_made"] == 0 and out.stats["adopted_from"].endswith("/laion-webdataset/00000.tar")
    assert out.stats["kept_as_stored"] == out.stats["status_counts"]["success"]  # 64 px, the config says 256
    assert out.stats["stored_formats"] == {"jpg": out.stats["status_counts"]["success"]}
    assert sum(site.hits.values()) == hits
    after = pl.read_delta(lake.table_uri("images")).filter(pl.col("shard") == key).sort("uid")
    assert after.drop("shard").equals(before.drop("shard"))
    # another image size or download setting in the config does not make them stale: they were adopted
    other = make_config(download={"min_success_rate": 0.0, "retries": 3}, images={"size": 128, "format": "webp"})
    plan = fingerprints.plan(lake, other, ["raw_urls", "images"], key)
    assert plan["images"] is not None and plan["raw_urls"] is not None


def test_stored_bytes_that_do_not_decode_are_failed_decode(i2d_folders, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(i2d_folders["files"], folder)
    victim = sorted(folder.glob("00000/*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    lake = Lake(tmp_path / "lake")
    adopt(lake, make_config(download={"min_success_rate": 0.0}), folder)
    raw = pl.read_delta(lake.table_uri("raw_urls")).filter(pl.col("img2dataset_key") == victim.stem)
    row = pl.read_delta(lake.table_uri("images")).filter(pl.col("uid") == raw["uid"][0]).row(0, named=True)
    assert row["status"] == "failed_decode" and row["image"] is None
    assert row["error"].startswith("img2dataset stored it, but") and raw["img2dataset_status"][0] == "success"


def test_a_tar_rewritten_between_check_and_publish_is_refused(i2d_folders, tmp_path):
    """The publish reads a tar's images at the offsets the check found (its headers are parsed
    once); bytes that changed there since are refused, not published unchecked."""
    folder = tmp_path / "moving"
    shutil.copytree(i2d_folders["webdataset"], folder)
    lake, cfg = Lake(tmp_path / "lake"), make_config(download={"min_success_rate": 0.0})
    key = register_folder(lake, str(folder))[0][0]
    stages.run_raw_urls(lake, cfg, key)
    shard = I2dShard(**registry.adoption(lake, key)["img2dataset"])
    raw = lake.read_shard(stages.RAW_URLS, key).select("uid", "url", pl.col(f"^{PREFIX}.*$"))
    rows = images_adopt.check(shard, raw, cfg.images)
    tar = folder / f"{shard.name}.tar"
    data = bytearray(tar.read_bytes())
    data[rows["stored_at"].drop_nulls().max() + 100] ^= 0xFF  # inside the last stored image
    tar.write_bytes(bytes(data))
    with pytest.raises(LaionAssetsError, match="changed while it was adopted: adopt the shard again"):
        list(images_adopt.batches(shard, rows))


@pytest.mark.slow
def test_adopted_shards_go_through_every_later_stage(i2d_site, i2d_folders, tmp_path, capsys):
    """The CLI's adoption through Dagster, then the whole pipeline (language, embeddings,
    scores, subsets, curation, webdataset export, kNN index) and a search, without a request."""
    import webdataset as wds
    from dagster import instance_for_test

    from laion_assets.cli import main
    from laion_assets.cli.pipeline import run_pipeline
    from laion_assets.core.exports.webdataset import train_shards

    site, _, _ = i2d_site
    cfg = make_config(download={"min_success_rate": 0.0}, export={"samples_per_tar": 4}, knn={"subsets": ["similar"]})
    config = str(write_config(tmp_path / "config.yaml", cfg))
    lake_uri = str(tmp_path / "lake")
    hits = sum(site.hits.values())
    with instance_for_test() as instance:
        summary = run_pipeline([], lake_uri, config, None, instance=instance, adopt=(str(i2d_folders["webdataset"]), "i2d"))
    status = {(line.shard, line.asset): line.status for line in summary.lines}
    assert summary.ok and set(status.values()) == {"materialized"}, summary.lines
    for shard in ("i2d-00000", "i2d-00001"):
        for table in ("raw_urls", "images", "language", "embeddings/tiny", "scores", "subsets/similar", "webdataset/similar"):
            assert status[(shard, table)] == "materialized"
    assert status[("(lake)", "knn/similar")] == "materialized"
    assert sum(site.hits.values()) == hits

    lake = Lake(lake_uri)
    subset = pl.read_delta(lake.table_uri("subsets/similar"))
    stored = stored_by_peer(i2d_folders["webdataset"], "webdataset")
    keys = dict(pl.read_delta(lake.table_uri("raw_urls")).select("uid", "img2dataset_key").iter_rows())
    urls, samples = train_shards(lake, "similar")
    exported = {json.loads(s["json"])["uid"]: s["jpg"] for s in wds.WebDataset(urls, shardshuffle=False)}
    assert samples == subset.height == len(exported) > 0
    assert all(blob == stored[keys[uid]] for uid, blob in exported.items())  # img2dataset's bytes, exported as they are

    uid = next(iter(exported))
    (tmp_path / "q.jpg").write_bytes(exported[uid])
    capsys.readouterr()
    assert main(["search", "--image", str(tmp_path / "q.jpg"), "--subset", "similar", "-k", "3", "--lake", lake_uri, "--config", config]) == 0
    found = [int(line.split()[2]) for line in capsys.readouterr().out.splitlines()[1:4]]
    assert uid in found
