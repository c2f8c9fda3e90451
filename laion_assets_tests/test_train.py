"""The exports of a real pipeline run: webdataset tars read by the `webdataset` library and by
open_clip's own training data pipeline, one training step of the tiny model on them, open_clip's
trainer run from `train-args` output unedited, and the kNN index built in the same run finding an
image of the subset from its bytes."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess

import numpy as np
import polars as pl
import pytest
import torch
from dagster import instance_for_test

from laion_assets.cli import main
from laion_assets.cli.pipeline import run_pipeline
from laion_assets.core.exports.webdataset import train_shards
from laion_assets.core.lake.delta import Lake
from laion_assets_tests.conftest import make_config, write_config


@pytest.mark.slow
def test_pipeline_exports_train_open_clip_and_search(tmp_path, shard_rows, capsys):
    import open_clip
    import webdataset as wds
    from open_clip_train.data import get_wds_dataset

    import laion_assets.core.embeddings.clip  # noqa: F401 (registers the tiny open_clip configs)

    inputs = tmp_path / "input"
    inputs.mkdir()
    shard_rows.write_parquet(inputs / "shard-a.parquet")
    cfg = make_config(export={"samples_per_tar": 8}, knn={"subsets": ["similar"]})
    config = write_config(tmp_path / "config.yaml", cfg)
    lake_uri = str(tmp_path / "lake")
    with instance_for_test() as instance:
        summary = run_pipeline([str(inputs)], lake_uri, str(config), None, instance=instance)
    status = {line.asset: line.status for line in summary.lines}
    assert status["webdataset/similar"] == status["knn/similar"] == "materialized", summary.lines
    assert "knn/pretty" not in status

    lake = Lake(lake_uri)
    subset = pl.read_delta(lake.table_uri("subsets/similar"))
    captions = dict(subset.select("uid", "caption").iter_rows())
    urls, samples = train_shards(lake, "similar")
    assert samples == subset.height > 8 and len(urls) == math.ceil(subset.height / 8)

    # the webdataset library: every sample decodes, its caption is the subset row's
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        assert sample["jpg"].size[0] > 0 and sample["json"]["uid"] in captions
        assert sample["txt"] == (captions[sample["json"]["uid"]] or "")
        seen[sample["json"]["uid"]] = sample["__key__"]
    assert set(seen) == set(captions)

    # open_clip's trainer pipeline (webdataset mode) and one optimizer step of the tiny model
    torch.manual_seed(0)
    model, preprocess_train, _ = open_clip.create_model_and_transforms("tiny_clip")
    tokenizer = open_clip.get_tokenizer("tiny_clip")
    args = argparse.Namespace(
        train_data="::".join(urls), val_data=None, dataset_resampled=False, train_num_samples=samples,
        train_data_upsampling_factors=None, seed=0, batch_size=4, workers=0, world_size=1,
    )
    data = get_wds_dataset(args, preprocess_train, is_train=True, epoch=0, tokenizer=tokenizer)
    images, texts = next(iter(data.dataloader))
    assert images.shape[0] == 4 and images.shape[1:] == (3, 224, 224) and texts.shape == (4, 77)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    image_features, text_features, logit_scale = model(images, texts)[:3]
    loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    # `train-args` prints open_clip's command for this export, which runs as printed (the tiny
    # model given as a local-dir config): fewer workers than asked, a precision for this device
    from laion_assets.core.exports.training import precision

    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny/open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("tiny_clip")}))
    capsys.readouterr()
    assert main(["train-args", "--subset", "similar", "--lake", lake_uri, "--model", f"local-dir:{tmp_path / 'tiny'}",
                 "--batch-size", "4", "--workers", "64", "--epochs", "1"]) == 0
    command = capsys.readouterr().out.strip()
    assert f"{{00000..{len(urls) - 1:05d}}}.tar" in command and f"--train-num-samples {samples}" in command
    assert f"--workers {min(len(urls), os.cpu_count())} " in command and f"--precision {precision()[0]}" in command
    trained = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert list(tmp_path.glob("logs/*/checkpoints/epoch_1.pt")), trained.stderr[-3000:]

    # the index of the same run: a subset image's own bytes find it first (the image least like
    # any other: resized copies of one photo are near-ties in the tiny model's space)
    from laion_assets.core.embeddings import vectors

    emb = pl.read_delta(lake.table_uri("embeddings/tiny")).filter(pl.col("uid").is_in(subset["uid"].implode()))
    x = vectors.from_column(emb["image_embedding"])
    sims = x @ x.T - 2 * np.eye(len(x))
    uid = emb["uid"][int(np.argmin(sims.max(axis=1)))]
    image = pl.read_delta(lake.table_uri("images")).filter(pl.col("uid") == uid)["image"][0]
    (tmp_path / "q.jpg").write_bytes(image)
    capsys.readouterr()
    assert main(["search", "--image", str(tmp_path / "q.jpg"), "--subset", "similar", "-k", "3", "--lake", lake_uri, "--config", str(config)]) == 0
    first = capsys.readouterr().out.splitlines()[1].split()
    assert int(first[2]) == uid and float(first[1]) == pytest.approx(1.0, abs=5e-3)


def test_export_and_index_assets_in_the_graph(tmp_path):
    """webdataset/<subset> per shard after its subset; knn/<subset> over every shard, one
    build at a time, following the subset by itself; `export`/`knn` pick the subsets."""
    from dagster import AssetKey

    from laion_assets.defs.definitions import build_defs
    from laion_assets.defs.resources import Settings

    config = write_config(tmp_path / "c.yaml", make_config(export={"subsets": ["similar"]}, knn={}))
    graph = build_defs(Settings(lake=str(tmp_path / "lake"), config=str(config))).resolve_asset_graph()
    parents = {k.to_user_string(): sorted(p.to_user_string() for p in graph.get(k).parent_keys) for k in graph.get_all_asset_keys() if k.path[0].startswith(("webdataset", "knn"))}
    assert parents == {
        "webdataset_similar": ["images", "subsets/similar"],
        "knn_similar": ["embeddings_tiny", "subsets/similar"],
        "knn_pretty": ["embeddings_tiny", "subsets/pretty"],
    }
    export = graph.get(AssetKey("webdataset_similar"))
    assert export.partitions_def.name == "shards" and "upstream gates passed" in str(export.automation_condition)
    index = graph.get(AssetKey("knn_similar"))
    assert index.partitions_def is None and index.pools == {"knn"} and index.automation_condition is not None


def test_train_command_fits_the_export():
    """Workers no more than the tars (and cores); a batch the worker with the fewest samples can
    fill: open_clip refuses more workers than tars, and a batch larger than a worker's samples
    trains nothing."""
    from laion_assets.core.exports.training import fitting

    sizes = [8, 8, 8, 3]
    assert fitting(sizes, 256, 1) == (27, 1)
    assert fitting(sizes, 4, 1) == (4, 1)
    assert fitting([5], 256, 0) == (5, 0)
    workers = min(2, os.cpu_count())
    assert fitting(sizes, 256, 2) == ({1: 27, 2: 11}[workers], workers)  # at worst the 3- and an 8-sample tar
    assert fitting(sizes, 256, 64)[1] == min(4, os.cpu_count())
