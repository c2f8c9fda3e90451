"""subsets: a named rule over a shard's rows and scores, with a recipe that says everything."""

from __future__ import annotations

import hashlib
import json

import polars as pl

from laion_assets import __version__
from laion_assets.core.config import PipelineConfig
from laion_assets.core.curation import passes
from laion_assets.core.lake import quality
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError, explained
from laion_assets.core.lake.tables import IMAGES, LANGUAGE, RAW_URLS, SCORES, WATERMARK, embeddings_table, subset_table
from laion_assets.core.scores import language
from laion_assets.core.scores.heads import file_sha256
from laion_assets.core.stages import fingerprints
from laion_assets.core.stages.publish import StageOutput, gate, publish
from laion_assets.core.subsets.predicates import candidates, check_columns, dropped_counts, predicate
from laion_assets.core.subsets.rules import SubsetConfig

IMAGE_COLUMNS = ["uid", "status", "original_width", "original_height", "width", "height", "sha256", "bytes_downloaded"]


def recipe(cfg: PipelineConfig, sub: SubsetConfig) -> dict:
    """Everything that decides the subset's rows: the rule, the similarity space and its model,
    the language detector, every thresholded column's producer (head file and sha256, watermark
    weights, or source column) and the code version. `subset_rules.from_recipe` rebuilds the rule."""
    space = cfg.similarity_space(sub)
    columns = {}
    for column in sorted(sub.threshold_columns):
        if column in cfg.scores.heads:
            head = cfg.scores.heads[column]
            fed = cfg.head_space(column)
            columns[column] = {
                "head": head.path, "sha256": file_sha256(head.path) if _exists(head.path) else None,
                "trained_on": head.trained_on, "space": fed, "model": cfg.embeddings.spaces[fed].identity,
            }
        elif column == "pwatermark" and cfg.watermark:
            columns[column] = {"watermark_model": cfg.watermark.identity, "checkpoint": cfg.watermark.checkpoint}
        else:
            columns[column] = {"source_column": column}
    body = {
        "subset": sub.name,
        "rule": sub.rule(),
        "similarity": {"space": space, "model": cfg.embeddings.spaces[space].identity, "published_for": sub.similarity_model}
        if sub.min_similarity is not None else None,
        "language": {
            "detector": language.detector_name(), "languages": sub.languages, "exclude_languages": sub.exclude_languages,
            "min_language_confidence": sub.min_language_confidence,
        } if sub.uses_language else None,
        "columns": columns,
        "code_version": __version__,
    }
    body["recipe_id"] = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return body


def _exists(path: str | None) -> bool:
    from pathlib import Path

    return bool(path) and Path(path).is_file()


def _check_provenance(pool: pl.DataFrame, body: dict, shard: str) -> None:
    """The rows were computed by what the recipe names; otherwise the recipe would lie."""
    def seen(column: str) -> set:
        return set(pool[column].drop_nulls().unique().to_list()) if column in pool.columns else set()

    wrong = []
    if body["similarity"] and seen("embedding_space") - {body["similarity"]["model"]}:
        wrong.append(f"embeddings/{body['similarity']['space']} are not {body['similarity']['model']}")
    if body["language"] and seen("language_detector") - {body["language"]["detector"]}:
        wrong.append(f"language was detected by {sorted(seen('language_detector'))}, not {body['language']['detector']}")
    for column, made_by in body["columns"].items():
        if "sha256" in made_by and {json.loads(v).get(column) for v in seen("head_files")} - {made_by["sha256"]}:
            wrong.append(f"scores.{column} was computed by another head file than {made_by['head']}")
        if "watermark_model" in made_by and seen("watermark_model") - {made_by["watermark_model"]}:
            wrong.append(f"pwatermark was computed by {sorted(seen('watermark_model'))}, not {made_by['watermark_model']}")
    if wrong:
        raise LaionAssetsError(f"shard {shard}: " + "; ".join(wrong) + ": re-materialize them for this config")


# rules that need the image: applied by the subset itself, once the rows are downloaded
IMAGE_RULES = {"min_image_bytes": None, "min_width": None, "min_height": None, "exclude_duplicates": ()}


def before_fetch(lake: Lake, cfg: PipelineConfig, shard: str) -> tuple[pl.Series, dict[str, int]]:
    """The uids of a shard that can pass `download.only_subset` before any image exists (its
    rules on metadata columns, language, adopted similarity and scores; the image rules wait
    for the subset itself), and how many rows each rule dropped."""
    sub = cfg.fetch_filter().model_copy(update=IMAGE_RULES)
    raw = lake.read_shard(RAW_URLS, shard).drop("shard")
    read = {table: lake.read_shard(table, shard).drop("shard") for table in cfg.fetch_filter_tables()}
    emb = next((df.select("uid", "similarity") for t, df in read.items() if t.startswith("embeddings/")), pl.DataFrame(schema={"uid": pl.Int64}))
    scores = read.get(SCORES, pl.DataFrame(schema={"uid": pl.Int64}))
    pool = candidates(raw, raw.select("uid", status=pl.lit("success")), read.get(LANGUAGE), emb, scores)
    check_columns(pool, sub, shard)
    return pool.filter(predicate(sub))["uid"], dropped_counts(pool, sub)


@explained
def run_subset(lake: Lake, cfg: PipelineConfig, sub: SubsetConfig, shard: str) -> StageOutput:
    """The shard's rows that pass `sub`, with every source column, the caption language, our
    similarity (in the subset's similarity space), scores and pwatermark, and the recipe id;
    the metadata counts how many rows each rule dropped."""
    space = cfg.similarity_space(sub)
    fingerprint = fingerprints.current(lake, cfg, subset_table(sub.name), shard)
    base = fingerprints.current(lake, cfg, subset_table(sub.name), shard, marks=False)
    body = recipe(cfg, sub)
    raw = lake.read_shard(RAW_URLS, shard).drop("shard")
    images = lake.read_shard(IMAGES, shard, IMAGE_COLUMNS)
    lang = lake.read_shard(LANGUAGE, shard).drop("shard") if lake.exists(LANGUAGE) else None
    if lang is None and (sub.uses_language or sub.min_caption_chars is not None):
        raise LaionAssetsError(f"subset {sub.name} filters on caption language or length: materialize `language` for shard {shard} first")
    emb = lake.read_shard(embeddings_table(space), shard, ["uid", "similarity", "embedding_space"])
    scores = lake.read_shard(SCORES, shard).drop("shard")
    marks = lake.read_shard(WATERMARK, shard).drop("shard") if cfg.watermark and lake.exists(WATERMARK) else None
    pool = candidates(raw, images, lang, emb, scores, marks)
    pool, blocked = passes.with_marks(lake, shard, pool)  # blocked rows leave; duplicate flags for the rules
    check_columns(pool, sub, shard)
    _check_provenance(pool, body, shard)
    rows = (
        pool.filter(predicate(sub))
        .drop("status", "head_files", "language_detector", *passes.MARK_COLUMNS, strict=False)
        .with_columns(recipe_id=pl.lit(body["recipe_id"]))
    )
    candidates_n = pool.filter(pl.col("status") == "success").height
    stats = {
        "recipe": body, "candidates": candidates_n, "kept": rows.height,
        "kept_fraction": round(rows.height / max(1, candidates_n), 4),
        "dropped_by_rule": dropped_counts(pool, sub),
    }
    stats["blocked_rows_left_out"] = blocked
    if sub.min_similarity is not None and sub.similarity_model and body["similarity"]["model"] != sub.similarity_model:
        stats["WARNING"] = f"similarity threshold published for {sub.similarity_model} applied to {body['similarity']['model']}"
    report = gate(subset_table(sub.name), shard, rows.select("uid", "url"), quality.subset_suite(raw.height), stats)
    return publish(lake, subset_table(sub.name), shard, rows, report, stats, {"recipe": json.dumps(body, sort_keys=True, default=str)}, fingerprint, base)
