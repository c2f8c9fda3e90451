"""LAION's semantics end to end, through Dagster: two embedding spaces (two different tiny
configs standing in for ViT-B/32 and ViT-L/14), heads fed their own space, the watermark tower
in the same pass, the caption language split into LAION-2B-en / 2B-multi / 1B-nolang with
their similarity thresholds, LAION's pre-filters counted per rule, and a subset rebuilt from
the recipe stored in its commit."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from dagster import instance_for_test

from laion_assets.cli.pipeline import run_pipeline
from laion_assets.core.embeddings import vectors
from laion_assets.core.embeddings.config import EmbeddingConfig, SpaceConfig
from laion_assets.core.lake.delta import Lake
from laion_assets.core.scores.config import HeadConfig, ScoresConfig, WatermarkConfig
from laion_assets.core.scores.heads import file_sha256, load_head
from laion_assets.core.scores.watermark import build
from laion_assets.core.stages import run_subset
from laion_assets.core.subsets.rules import SubsetConfig, from_recipe
from laion_assets_tests.conftest import BUNDLED, asset_key, b32_heads, make_config, write_config

CAPTIONS = {
    "en": ["a ginger cat sleeping on a wooden chair", "aerial view of the coastline at sunset", "a cup of black coffee on a saucer",
           "vintage poster of a rocket launch in blue and red"],
    "de": ["Eine rote Katze schläft auf einem Holzstuhl", "Luftaufnahme der Küste bei Sonnenuntergang"],
    "fr": ["Une tasse de café noir sur une soucoupe en porcelaine", "Affiche ancienne du lancement d'une fusée"],
    "ja": ["木の椅子で眠る茶色の猫", "夕日に染まる海岸線の空撮"],
    "nolang": ["IMG_2034.JPG", "P1030567.jpg", "_MG_4471"],
    "short": ["cat"],  # under LAION's 5 characters
}
ORDER = [c for group in CAPTIONS.values() for c in group]
HEADS = {  # column -> (file, space it must be fed): LAION's L/14 heads as the demo ships them
    "aesthetic": (BUNDLED / "laion-aesthetic-predictor/sa_0_4_vit_l_14_linear.pth", "l14"),
    "aesthetic_v2": (BUNDLED / "improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth", "l14"),
    "punsafe": (BUNDLED / "clip-based-nsfw-detector/clip_ViT-L-14_openai_binary_nsfw_head.pth", "l14"),
    "aesthetic_b32": (b32_heads()["aesthetic"], "b32"),
}


@pytest.fixture
def env(tmp_path, site, server):
    rows = [
        {"URL": f"{server.base_url}/img/{e['file']}", "TEXT": ORDER[i % len(ORDER)], "pwatermark": 0.9 if i % 5 == 0 else 0.1}
        for i, e in enumerate(site[1])
    ]
    inputs = tmp_path / "input"
    inputs.mkdir()
    pl.DataFrame(rows).write_parquet(inputs / "multi-00000.parquet")
    ckpt = tmp_path / "watermark.pt"
    torch.save(build("test_efficientnet").state_dict(), ckpt)
    cfg = make_config(
        embeddings=EmbeddingConfig(spaces={"b32": SpaceConfig(model="tiny"), "l14": SpaceConfig(model="tiny-l")}, batch_size=16, chunk_rows=32),
        scores=ScoresConfig(
            heads={name: HeadConfig(path=str(f), trained_on="ViT-L-14/openai" if space == "l14" else "ViT-B-32/openai", space=space)
                   for name, (f, space) in HEADS.items()},
            allow_embedding_space_mismatch=True,
        ),
        watermark=WatermarkConfig(model="test_efficientnet", checkpoint=str(ckpt)),
        subsets=(
            # published rules, similarity thresholds moved to the middle of the tiny models' range
            SubsetConfig(preset="laion2b_en", similarity_space="b32", min_similarity=0.0),
            SubsetConfig(preset="laion2b_multi", similarity_space="l14", min_similarity=0.0),
            SubsetConfig(preset="laion1b_nolang", similarity_space="l14", min_similarity=0.0),
            SubsetConfig(preset="laion_aesthetics_v1", above={"aesthetic": 4.5}),
            SubsetConfig(name="laion_watermark_source", below={"source_pwatermark": 0.8}),
        ),
    )
    return {"inputs": inputs, "lake": str(tmp_path / "lake"), "config": str(write_config(tmp_path / "c.yaml", cfg)), "cfg": cfg}


def table(lake: Lake, name: str) -> pl.DataFrame:
    return pl.read_delta(lake.table_uri(name)).drop("shard")


@pytest.mark.slow
def test_two_spaces_language_split_watermark_and_recipes(env):
    with instance_for_test() as instance:
        summary = run_pipeline([str(env["inputs"])], env["lake"], env["config"], None, instance=instance)
        assert summary.ok, [(line.asset, line.detail) for line in summary.lines if line.status != "materialized"]
        meta = {k: instance.get_latest_materialization_event(asset_key(k)).asset_materialization.metadata
                for k in ("scores", "watermark", "language", "subsets/laion2b_en", "subsets/laion_aesthetics_v1")}
    lake = Lake(env["lake"])
    raw, images, lang = table(lake, "raw_urls"), table(lake, "images"), table(lake, "language")
    emb = {s: table(lake, f"embeddings/{s}") for s in ("b32", "l14")}
    scores, marks = table(lake, "scores"), table(lake, "watermark")
    ok = images.filter(pl.col("status") == "success")

    # two spaces, two different models, one pass; the watermark tower scored every image
    assert {s: e["embedding_space"].unique().to_list() for s, e in emb.items()} == {"b32": ["tiny/random-seed0"], "l14": ["tiny-l/random-seed0"]}
    assert vectors.from_column(emb["b32"]["image_embedding"]).shape[1] == 512 and vectors.from_column(emb["l14"]["image_embedding"]).shape[1] == 768
    assert marks.height == ok.height and marks["pwatermark"].is_between(0, 1).all()
    assert meta["watermark"]["trained"].value is False and "MEANINGLESS" in meta["watermark"]["WARNING"].value

    # each head was fed its own space: recomputed here from that space's table
    heads_meta = meta["scores"]["heads"].data
    for name, (file, space) in HEADS.items():
        assert heads_meta[name]["space"] == space and heads_meta[name]["sha256"] == file_sha256(file)
        e = emb[space].sort("uid")
        head = load_head(name, env["cfg"].scores.heads[name])
        expected = pl.DataFrame({"uid": e["uid"], "want": head(vectors.from_column(e["image_embedding"]))})
        got = scores.join(expected, on="uid")
        assert got.height == ok.height and np.allclose(got[name], got["want"], atol=1e-4), name

    # the language split and its thresholds, computed here independently of core.subsets
    pool = (raw.join(images, on="uid").join(lang, on="uid").filter(pl.col("status") == "success")
            .join(emb["b32"].select("uid", sim_b32="similarity"), on="uid").join(emb["l14"].select("uid", sim_l14="similarity"), on="uid"))
    assert set(pool["language"]) >= {"en", "de", "fr", "ja", "nolang"}
    base = (pl.col("caption_chars") >= 5) & (pl.col("bytes_downloaded") >= 5000)
    want = {
        "laion2b_en": base & (pl.col("language") == "en") & (pl.col("sim_b32") >= 0.0),
        "laion2b_multi": base & ~pl.col("language").is_in(["en", "nolang"]) & (pl.col("sim_l14") >= 0.0),
        "laion1b_nolang": base & (pl.col("language") == "nolang") & (pl.col("sim_l14") >= 0.0),
    }
    for name, rule in want.items():
        sub = table(lake, f"subsets/{name}")
        assert set(sub["uid"]) == set(pool.filter(rule)["uid"]), name
        assert 0 < sub.height < pool.filter(base).height, name
        similarity = pool.select("uid", sim=pl.col("sim_b32") if name == "laion2b_en" else pl.col("sim_l14"))
        assert sub.join(similarity, on="uid").select((pl.col("similarity") == pl.col("sim")).all()).item(), name
    assert not set(table(lake, "subsets/laion2b_en")["uid"]) & set(table(lake, "subsets/laion2b_multi")["uid"])

    # LAION's pre-filters, counted per rule (each dropped row under its first failing rule)
    dropped = meta["subsets/laion2b_en"]["dropped_by_rule"].data
    assert dropped["min_caption_chars"] == pool.filter(pl.col("caption_chars") < 5).height > 0
    assert dropped["min_image_bytes"] == pool.filter((pl.col("caption_chars") >= 5) & (pl.col("bytes_downloaded") < 5000)).height
    assert dropped["no_image"] == images.height - ok.height
    assert sum(dropped.values()) + table(lake, "subsets/laion2b_en").height == images.height

    # thresholds on our scores and our pwatermark; LAION's own pwatermark column on request
    v1 = table(lake, "subsets/laion_aesthetics_v1")
    expected_v1 = scores.join(marks, on="uid").filter((pl.col("punsafe") < 0.5) & (pl.col("pwatermark") < 0.8) & (pl.col("aesthetic") > 4.5))
    assert set(v1["uid"]) == set(expected_v1["uid"])
    source = table(lake, "subsets/laion_watermark_source")
    assert set(source["uid"]) == set(pool.filter(pl.col("pwatermark") < 0.8)["uid"]) and "source_pwatermark" in source.columns

    # the recipe says everything, and rebuilds the same rows on its own
    commit = lake.table("subsets/laion_aesthetics_v1").history(1)[0]
    recipe = json.loads(commit["recipe"])
    assert recipe["columns"]["punsafe"]["sha256"] == file_sha256(HEADS["punsafe"][0])
    assert recipe["columns"]["pwatermark"]["watermark_model"] == env["cfg"].watermark.identity
    assert recipe["code_version"] and recipe["recipe_id"] == v1["recipe_id"].unique().item()
    en_recipe = json.loads(lake.table("subsets/laion2b_en").history(1)[0]["recipe"])
    assert en_recipe["similarity"] == {"space": "b32", "model": "tiny/random-seed0", "published_for": "ViT-B-32/openai"}
    assert en_recipe["language"]["detector"].startswith("cld3/") and en_recipe["language"]["languages"] == ["en"]
    before = table(lake, "subsets/laion2b_en").sort("uid")
    rebuilt_rule = from_recipe(en_recipe)
    bare = env["cfg"].model_copy(update={"subsets": ()})
    out = run_subset(lake, bare, rebuilt_rule, "multi-00000")
    assert out.stats["recipe"]["recipe_id"] == en_recipe["recipe_id"]
    assert table(lake, "subsets/laion2b_en").sort("uid").equals(before)
