"""subsets: a named filter over a shard's rows and scores, with its recipe."""

from __future__ import annotations

import json

import polars as pl

from laion_assets import __version__
from laion_assets.core import quality
from laion_assets.core.config import PipelineConfig, SubsetConfig
from laion_assets.core.lake import Lake
from laion_assets.core.stages.publish import (
    IMAGES, RAW_URLS, SCORES, StageOutput, embeddings_table, gate, publish, subset_table,
)
from laion_assets.core.subsets import candidates, predicate


def run_subset(lake: Lake, cfg: PipelineConfig, sub: SubsetConfig, shard: str) -> StageOutput:
    """The shard's rows that pass `sub`, with every source column, our similarity (in the
    subset's similarity space) and scores, and the recipe id."""
    space = cfg.similarity_space(sub)
    raw = lake.read_shard(RAW_URLS, shard).drop("shard")
    images = lake.read_shard(IMAGES, shard, ["uid", "status", "original_width", "original_height", "width", "height", "sha256"])
    emb = lake.read_shard(embeddings_table(space), shard, ["uid", "similarity", "embedding_space"])
    scores = lake.read_shard(SCORES, shard).drop("shard")
    pool = candidates(raw, images, emb, scores)
    recipe = sub.recipe(cfg.embeddings.spaces[space].identity, __version__)
    rows = pool.filter(predicate(sub)).drop("status").with_columns(recipe_id=pl.lit(recipe["recipe_id"]))
    report = gate(subset_table(sub.name), shard, rows.select("uid", "url"), quality.subset_suite(raw.height))
    stats = {"recipe": recipe, "candidates": pool.filter(pl.col("status") == "success").height, "kept": rows.height}
    stats["kept_fraction"] = round(rows.height / max(1, stats["candidates"]), 4)
    return publish(lake, subset_table(sub.name), shard, rows, report, stats, {"recipe": json.dumps(recipe, sort_keys=True)})
