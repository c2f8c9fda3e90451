"""Subsets: a named predicate over scores, applied per shard (LAION-5B rule, aesthetics, ...)."""

from __future__ import annotations

import polars as pl

from laion_assets.core.config import SubsetConfig

# Source columns that our stages also compute: in a subset, LAION's originals get a prefix.
COMPUTED = ("similarity", "punsafe", "aesthetic", "width", "height", "sha256", "status")


def predicate(cfg: SubsetConfig) -> pl.Expr:
    """True for rows in the subset. punsafe/pwatermark filters keep unscored rows (null)."""
    conds = [pl.col("status") == "success"]
    if cfg.min_similarity is not None:
        conds.append(pl.col("similarity") >= cfg.min_similarity)
    if cfg.max_punsafe is not None:
        conds.append(pl.col("punsafe").is_null() | (pl.col("punsafe") < cfg.max_punsafe))
    if cfg.min_aesthetic is not None:
        conds.append(pl.col("aesthetic") >= cfg.min_aesthetic)
    if cfg.max_pwatermark is not None:
        conds.append(pl.col("source_pwatermark").is_null() | (pl.col("source_pwatermark") < cfg.max_pwatermark))
    if cfg.min_width is not None:
        conds.append(pl.col("original_width") >= cfg.min_width)
    if cfg.min_height is not None:
        conds.append(pl.col("original_height") >= cfg.min_height)
    return pl.all_horizontal(conds)


def candidates(raw: pl.DataFrame, images: pl.DataFrame, embeddings: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """One row per sample with every source column and our scores, ready to filter. Source
    columns named like one we compute get a `source_` prefix; a score no head computes is null."""
    ours = {c.lower() for c in (*COMPUTED, *scores.columns, "pwatermark")} - {"uid"}
    raw = raw.rename({c: f"source_{c}" for c in raw.columns if c.lower() in ours})
    if "source_pwatermark" not in raw.columns:
        raw = raw.with_columns(source_pwatermark=pl.lit(None, pl.Float64))
    scores = scores.with_columns(pl.lit(None, pl.Float32).alias(c) for c in ("aesthetic", "punsafe") if c not in scores.columns)
    return (
        raw.join(images, on="uid", how="inner")
        .join(embeddings, on="uid", how="left")
        .join(scores, on="uid", how="left")
    )
