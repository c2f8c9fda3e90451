"""Subsets: a named rule over a shard's rows, applied per shard, each dropped row counted under
the first rule that drops it (LAION's pre-filters, language, similarity, score thresholds)."""

from __future__ import annotations

import polars as pl

from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.scores.language import NOLANG
from laion_assets.core.subsets.rules import SubsetConfig

# Source columns that our stages also compute: in a subset, LAION's originals get a prefix.
COMPUTED = (
    "similarity", "punsafe", "aesthetic", "aesthetic_v2", "pwatermark", "width", "height", "sha256", "status",
    "language", "language_confidence", "language_guess", "caption_chars",
)


def rules(cfg: SubsetConfig) -> list[tuple[str, pl.Expr]]:
    """(name, keep-expression) per rule of `cfg`, in the order drops are counted; a row whose
    value is missing fails the rule."""
    out: list[tuple[str, pl.Expr]] = []
    if cfg.min_caption_chars is not None:
        out.append(("min_caption_chars", pl.col("caption_chars") >= cfg.min_caption_chars))
    if cfg.min_image_bytes is not None:
        out.append(("min_image_bytes", pl.col("bytes_downloaded") >= cfg.min_image_bytes))
    if cfg.min_width is not None:
        out.append(("min_width", pl.col("original_width") >= cfg.min_width))
    if cfg.min_height is not None:
        out.append(("min_height", pl.col("original_height") >= cfg.min_height))
    if cfg.uses_language:
        lang = pl.col("language")
        if cfg.min_language_confidence is not None:
            lang = pl.when(pl.col("language_confidence") >= cfg.min_language_confidence).then(lang).otherwise(pl.lit(NOLANG))
        if cfg.languages is not None:
            out.append(("languages", lang.is_in(list(cfg.languages))))
        if cfg.exclude_languages:
            out.append(("exclude_languages", ~lang.is_in(list(cfg.exclude_languages))))
    if cfg.min_similarity is not None:
        out.append(("min_similarity", pl.col("similarity") >= cfg.min_similarity))
    for column, value in cfg.at_least.items():
        out.append((f"at_least.{column}", pl.col(column) >= value))
    for column, value in cfg.above.items():
        out.append((f"above.{column}", pl.col(column) > value))
    for column, value in cfg.below.items():
        out.append((f"below.{column}", pl.col(column) < value))
    for kind in cfg.exclude_duplicates:  # flags added from the lake-wide marks (core.curation)
        out.append((f"exclude_duplicates.{kind}", ~pl.col(f"duplicate_{kind}")))
    return [(name, expr.fill_null(False)) for name, expr in out]


def predicate(cfg: SubsetConfig) -> pl.Expr:
    """True for rows in the subset: a successful image passing every rule."""
    return pl.all_horizontal([pl.col("status") == "success", *(expr for _, expr in rules(cfg))])


def drop_reason(cfg: SubsetConfig) -> pl.Expr:
    """The first rule a successful image fails (null when it is kept)."""
    named = rules(cfg)
    if not named:
        return pl.lit(None, pl.String)
    return pl.coalesce([pl.when(~expr).then(pl.lit(name)) for name, expr in named])


def dropped_counts(pool: pl.DataFrame, cfg: SubsetConfig) -> dict[str, int]:
    """Per rule, how many successful images it dropped (each counted once, under its first
    failing rule); rows without an image are counted as `no_image`."""
    reasons = pool.select(
        reason=pl.when(pl.col("status") != "success").then(pl.lit("no_image")).otherwise(drop_reason(cfg))
    )
    counts = reasons.drop_nulls().group_by("reason").len()
    order = ["no_image"] + [name for name, _ in rules(cfg)]
    got = dict(counts.iter_rows())
    return {name: int(got.get(name, 0)) for name in order}


def candidates(
    raw: pl.DataFrame, images: pl.DataFrame, language: pl.DataFrame | None, embeddings: pl.DataFrame,
    scores: pl.DataFrame, watermark: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One row per sample with every source column and what we computed, ready to filter.
    Source columns named like one we compute get a `source_` prefix."""
    ours = {c.lower() for c in (*COMPUTED, *scores.columns)} - {"uid"}
    raw = raw.rename({c: f"source_{c}" for c in raw.columns if c.lower() in ours})
    pool = raw.join(images, on="uid", how="inner")
    for part in (language, embeddings, scores, watermark):
        if part is not None:
            pool = pool.join(part, on="uid", how="left")
    return pool


def check_columns(pool: pl.DataFrame, cfg: SubsetConfig, shard: str) -> None:
    """A threshold on a column this shard does not have is an error, not an empty subset."""
    missing = sorted(c for c in cfg.threshold_columns if c not in pool.columns)
    if missing:
        sources = sorted(c for c in pool.columns if c.startswith("source_") or c.isupper())
        raise LaionAssetsError(
            f"subset {cfg.name}: shard {shard} has no column {', '.join(missing)} (source columns: "
            f"{', '.join(sources) or 'none'}): fix the subset's thresholds"
        )
