"""The five stages as plain functions: compute a shard, audit it, publish it (write-audit-publish).

Each returns a StageOutput with the numbers the UI shows; a shard that fails its suite raises
ValidationFailed (carrying the report) and is never published. The Dagster layer wraps these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from laion_assets import __version__
from laion_assets.core import quality, registry, vectors
from laion_assets.core.config import PipelineConfig, SubsetConfig
from laion_assets.core.download import IMAGES_SCHEMA, STATUSES, Progress, ShardDownloader
from laion_assets.core.errors import LaionAssetsError, ValidationFailed
from laion_assets.core.heads import configured_heads
from laion_assets.core.ingest import normalize, read_shard_file
from laion_assets.core.lake import Lake
from laion_assets.core.subsets import candidates, predicate

log = logging.getLogger(__name__)

RAW_URLS, IMAGES, EMBEDDINGS, SCORES = "raw_urls", "images", "embeddings", "scores"
STAGING_IMAGES, STAGING_EMBEDDINGS = "_staging/images", "_staging/embeddings"


def subset_table(name: str) -> str:
    return f"subsets/{name}"


@dataclass
class StageOutput:
    rows: int
    version: int
    schema: pa.Schema
    report: quality.Report
    stats: dict = field(default_factory=dict)
    preview: pl.DataFrame | None = None


def _gate(stage: str, shard: str, df: pl.DataFrame, suite: list[quality.Expectation]) -> quality.Report:
    report = quality.validate(stage, shard, df, suite)
    if not report.success:
        err = ValidationFailed(stage, shard, report.failures())
        err.report = report
        raise err
    return report


def _publish(lake: Lake, table: str, shard: str, df: pl.DataFrame, report, stats, meta=None) -> StageOutput:
    df = df.drop("shard", strict=False)
    version = lake.publish_shard(table, shard, df, metadata={"stage": table, "code_version": __version__, **(meta or {})})
    return StageOutput(df.height, version, df.to_arrow().schema, report, stats, preview(df))


def _publish_stream(
    lake: Lake, table: str, shard: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch],
    rows: int, report, stats, meta: dict, staging: str,
) -> StageOutput:
    """`_publish` for a stream of staged batches (bounded memory); the shard's staging goes after."""
    reader = pa.RecordBatchReader.from_batches(schema, (b.cast(schema) for b in batches))
    version = lake.publish_stream(table, shard, reader, metadata={"stage": table, "code_version": __version__, **meta})
    lake.delete_shard(staging, shard)
    return StageOutput(rows, version, schema, report, stats, preview(lake.scan(table).filter(pl.col("shard") == shard).head(5).collect()))


def preview(df: pl.DataFrame, rows: int = 5) -> pl.DataFrame:
    """The first rows without bytes or vectors, long strings cut: for a look in the UI."""
    cols = [c for c, t in df.schema.items() if t not in (pl.Binary,) and not isinstance(t, (pl.List, pl.Array))]
    return df.head(rows).select(cols).with_columns(pl.col(pl.String).str.slice(0, 80))


def _recipe_hash(*parts) -> str:
    return hashlib.sha256(json.dumps([p.model_dump(mode="json") for p in parts], sort_keys=True).encode()).hexdigest()[:16]


# -- raw_urls ------------------------------------------------------------------------------

def run_raw_urls(lake: Lake, cfg: PipelineConfig, shard: str) -> StageOutput:
    source = registry.source_of(lake, shard)
    res = normalize(read_shard_file(source), source)
    kept = res.rows.height
    report = _gate(RAW_URLS, shard, res.rows.select("uid", "url"), quality.raw_urls_suite(res.input_rows - sum(res.rejected.values())))
    stats = {"source": source, "input_rows": res.input_rows, "rows": kept, "rejected": res.rejected, "renamed_columns": res.renamed}
    for reason, n in res.rejected.items():
        log.warning("shard %s: %d rows kept out: %s", shard, n, reason)
    return _publish(lake, RAW_URLS, shard, res.rows, report, stats, {"source": source})


# -- images --------------------------------------------------------------------------------

def run_images(
    lake: Lake, cfg: PipelineConfig, shard: str, *, retry_failures: bool = False,
    on_progress: Callable[[Progress], None] | None = None, resolver=None,
) -> StageOutput:
    """Download a shard. Chunks are staged as they finish, so a killed run resumes where it
    stopped; `retry_failures` re-fetches only the published rows whose failure is retryable.

    Memory stays bounded: image bytes go from the downloader to staging chunk by chunk, the
    gate reads only metadata columns, and the publish streams record batches to Delta.
    """
    raw = lake.read_shard(RAW_URLS, shard, ["uid", "url"])
    recipe = _recipe_hash(cfg.images)
    # Staged rows from another image recipe, and retryable failures, are fetched again: drop
    # them first, so every uid is staged at most once.
    lake.delete_where(STAGING_IMAGES, f"shard = '{shard}' AND (recipe <> '{recipe}' OR retryable = true)")
    kept = pl.DataFrame(schema={"uid": pl.Int64})
    if retry_failures:
        if not lake.exists(IMAGES) or lake.shard_row_count(IMAGES, shard) == 0:
            raise LaionAssetsError(f"shard '{shard}' has no published images to retry: materialize images first")
        kept = lake.read_shard(IMAGES, shard, ["uid", "retryable"]).filter(~pl.col("retryable").fill_null(False)).select("uid")
    staged = lake.read_shard(STAGING_IMAGES, shard, ["uid"]) if lake.exists(STAGING_IMAGES) else kept.clear()
    done = pl.concat([kept, staged])["uid"]
    todo = raw.filter(~pl.col("uid").is_in(done.implode()))
    if done.len():
        log.info("shard %s: %d rows already done (kept or resumed), %d to fetch", shard, done.len(), todo.height)

    def stage_chunk(table: pa.Table) -> None:
        lake.append(STAGING_IMAGES, table.append_column("recipe", pa.array([recipe] * table.num_rows, pa.string())), shard=shard)

    started = time.monotonic()
    progress = ShardDownloader(cfg.download, cfg.images, resolver=resolver).run(
        todo.iter_rows(), todo.height, stage_chunk, on_progress
    )
    elapsed = time.monotonic() - started

    meta = ["uid", "status", "error", "width", "bytes_downloaded"]
    sources = [(STAGING_IMAGES, None)] + ([(IMAGES, kept["uid"])] if retry_failures else [])
    audit_parts = []
    for table, uids in sources:
        lf = lake.scan(table).filter(pl.col("shard") == shard)
        if uids is not None:
            lf = lf.filter(pl.col("uid").is_in(uids.implode()))
        audit_parts.append(lf.select(*meta, stored=pl.col("image").bin.size()).collect(engine="streaming"))
    rows = pl.concat(audit_parts)
    audit = rows.select(
        "uid", "status", pl.col("width").fill_null(1),
        is_success=pl.col("status") == "success",
        has_image_iff_success=(pl.col("status") == "success") == pl.col("stored").is_not_null(),
    )
    report = _gate(IMAGES, shard, audit, quality.images_suite(raw.height, STATUSES, cfg.download.min_success_rate))
    counts = dict(rows.group_by("status").len().sort("status").iter_rows())
    errors = dict(rows.filter(pl.col("status") != "success").group_by(pl.col("error").str.slice(0, 60)).len().sort("len", descending=True).head(10).iter_rows())
    stats = {
        "status_counts": counts, "success_rate": round(counts.get("success", 0) / max(1, rows.height), 4),
        "top_errors": errors, "fetched_this_run": progress.done, "resumed_rows": done.len(),
        "bytes_downloaded": int(rows["bytes_downloaded"].fill_null(0).sum()),
        "bytes_stored": int(rows["stored"].fill_null(0).sum()),
        "duration_s": round(elapsed, 2), "images_per_s": round(progress.done / max(elapsed, 1e-9), 1),
    }
    batches = [lake.batches(STAGING_IMAGES, shard, IMAGES_SCHEMA.names)]
    if retry_failures:
        batches.append(lake.batches(IMAGES, shard, IMAGES_SCHEMA.names, uids=kept["uid"].to_list()))
    return _publish_stream(
        lake, IMAGES, shard, IMAGES_SCHEMA, (b for part in batches for b in part), rows.height,
        report, stats, {"recipe": recipe}, STAGING_IMAGES,
    )


def _chunked(frames: Iterable[pl.DataFrame], rows: int) -> Iterator[pl.DataFrame]:
    """Regroup a stream of frames into frames of `rows` rows (the last one may be shorter)."""
    buf, n = [], 0
    for df in frames:
        while df.height:
            take = df.head(rows - n)
            df = df.slice(take.height)
            buf.append(take)
            n += take.height
            if n == rows:
                yield pl.concat(buf)
                buf, n = [], 0
    if buf:
        yield pl.concat(buf)


def _uids(lake: Lake, table: str, shard: str, where: pl.Expr | bool = True) -> pl.Series:
    if not lake.exists(table):
        return pl.Series("uid", [], pl.Int64)
    return lake.scan(table).filter((pl.col("shard") == shard) & where).select("uid").collect()["uid"]


# -- embeddings ----------------------------------------------------------------------------

def run_embeddings(lake: Lake, cfg: PipelineConfig, shard: str, encoder_factory) -> StageOutput:
    """CLIP image and text embeddings for the successful images, in memory bounded for any
    shard size: images are read in record batches and encoded `chunk_rows` at a time, each
    chunk staged as soon as it is done (a killed run resumes after the last staged chunk);
    the audit reads the staged vectors back batch by batch and the publish streams them into
    one Delta commit."""
    ecfg = cfg.embeddings
    recipe = _recipe_hash(ecfg)
    # Staged chunks are reused only for the same config and the same published images: any
    # republish of the images shard writes new files, so its file list identifies the bytes.
    images_files = "\n".join(lake.shard_files(IMAGES, shard))
    stage_key = hashlib.sha256(f"{recipe}\n{images_files}".encode()).hexdigest()[:16]
    lake.delete_where(STAGING_EMBEDDINGS, f"shard = '{shard}' AND recipe <> '{stage_key}'")
    success = _uids(lake, IMAGES, shard, pl.col("status") == "success")
    staged = _uids(lake, STAGING_EMBEDDINGS, shard)  # all of them successes of these images
    total = success.len() - staged.len()
    if staged.len():
        log.info("shard %s: %d embeddings resumed, %d to compute", shard, staged.len(), total)
    captions = lake.read_shard(RAW_URLS, shard, ["uid", "caption"])
    encoder = encoder_factory()
    model = encoder.clip
    todo = (
        pl.from_arrow(b).filter((pl.col("status") == "success") & ~pl.col("uid").is_in(staged.implode()))
        for b in lake.batches(IMAGES, shard, ["uid", "status", "image"])
    )
    started, done = time.monotonic(), 0
    for chunk in _chunked(todo, ecfg.chunk_rows):
        chunk = chunk.join(captions, on="uid", how="left", maintain_order="left")
        img = encoder.images(chunk["image"].to_list())
        txt = encoder.texts(chunk["caption"].to_list())
        lake.append(STAGING_EMBEDDINGS, pa.table({
            "uid": chunk["uid"].to_arrow(),
            "image_embedding": vectors.to_column(img, ecfg.dtype),
            "text_embedding": vectors.to_column(txt, ecfg.dtype),
            "similarity": pa.array((img * txt).sum(axis=1).astype(np.float32)),
            "recipe": pa.array([stage_key] * chunk.height, pa.string()),
        }), shard=shard)
        done += chunk.height
        rate = done / max(time.monotonic() - started, 1e-9)
        log.info("shard %s: embedded %d/%d (%.1f images/s)", shard, done, total, rate)
    elapsed = time.monotonic() - started

    columns = ["uid", "image_embedding", "text_embedding", "similarity"]
    audit = [
        pl.from_arrow(b).select(
            "uid", "similarity",
            image_norm=pl.lit(np.linalg.norm(vectors.from_arrow(b["image_embedding"], model.dim), axis=1)),
            text_norm=pl.lit(np.linalg.norm(vectors.from_arrow(b["text_embedding"], model.dim), axis=1)),
        )
        for b in lake.batches(STAGING_EMBEDDINGS, shard, columns)
    ]
    audit = pl.concat(audit) if audit else pl.DataFrame(schema={"uid": pl.Int64, "similarity": pl.Float32, "image_norm": pl.Float32, "text_norm": pl.Float32})
    report = _gate(EMBEDDINGS, shard, audit, quality.embeddings_suite(success.len(), cfg.quality.embedding_norm_tolerance))
    stats = {
        **model.describe(), "dtype": ecfg.dtype, "images": success.len(), "resumed_rows": staged.len(),
        "mean_similarity": round(float(audit["similarity"].mean() or 0), 4),
        "duration_s": round(elapsed, 2), "images_per_s": round(done / max(elapsed, 1e-9), 1),
    }
    if model.meaningless:
        stats["WARNING"] = "tiny random model: embeddings and similarities are meaningless"
    vec = vectors.arrow_type(ecfg.dtype)
    schema = pa.schema([("uid", pa.int64()), ("image_embedding", vec), ("text_embedding", vec),
                        ("similarity", pa.float32()), ("embedding_space", pa.string())])
    published = (
        b.append_column("embedding_space", pa.array([model.space] * b.num_rows, pa.string()))
        for b in lake.batches(STAGING_EMBEDDINGS, shard, columns)
    )
    return _publish_stream(
        lake, EMBEDDINGS, shard, schema, published, audit.height, report, stats,
        {"embedding_space": model.space, "recipe": recipe}, STAGING_EMBEDDINGS,
    )


# -- scores --------------------------------------------------------------------------------

def run_scores(lake: Lake, cfg: PipelineConfig, shard: str) -> StageOutput:
    """Aesthetic and NSFW heads over the image embeddings, both in one pass over record
    batches (memory bounded for any shard size); unscored is null."""
    first = lake.scan(EMBEDDINGS).filter(pl.col("shard") == shard).select("image_embedding", "embedding_space").head(1).collect()
    space = first["embedding_space"][0] if first.height else cfg.embeddings.space
    dim = vectors.from_column(first["image_embedding"]).shape[1] if first.height else None
    heads = configured_heads(cfg.scores, space, dim)
    parts = []
    for b in lake.batches(EMBEDDINGS, shard, ["uid", "image_embedding", "embedding_space"]):
        x = vectors.from_arrow(b["image_embedding"], dim)
        cols = {"uid": pl.from_arrow(b["uid"]), "embedding_space": pl.from_arrow(b["embedding_space"])}
        for name, head in (("aesthetic", heads.get("aesthetic")), ("punsafe", heads.get("nsfw"))):
            cols[name] = (
                pl.Series(name, head(x), pl.Float32) if head is not None
                else pl.repeat(None, b.num_rows, dtype=pl.Float32, eager=True)
            )
        parts.append(pl.DataFrame(cols).select("uid", "aesthetic", "punsafe", "embedding_space"))
    rows = pl.concat(parts) if parts else pl.DataFrame(schema={"uid": pl.Int64, "aesthetic": pl.Float32, "punsafe": pl.Float32, "embedding_space": pl.String})
    report = _gate(SCORES, shard, rows.select("uid", "aesthetic", "punsafe"), quality.scores_suite(rows.height))
    stats = {
        "heads": {k: f"{h.kind} {h.path} (trained on {h.trained_on})" for k, h in heads.items()},
        "mean_aesthetic": rows["aesthetic"].mean(), "mean_punsafe": rows["punsafe"].mean(),
        "embedding_space": space if first.height else "",
    }
    return _publish(lake, SCORES, shard, rows, report, stats)


# -- subsets -------------------------------------------------------------------------------

def run_subset(lake: Lake, cfg: PipelineConfig, sub: SubsetConfig, shard: str) -> StageOutput:
    raw = lake.read_shard(RAW_URLS, shard).drop("shard")
    images = lake.read_shard(IMAGES, shard, ["uid", "status", "original_width", "original_height", "width", "height", "sha256"])
    emb = lake.read_shard(EMBEDDINGS, shard, ["uid", "similarity", "embedding_space"])
    scores = lake.read_shard(SCORES, shard, ["uid", "aesthetic", "punsafe"])
    pool = candidates(raw, images, emb, scores)
    recipe = sub.recipe(cfg.embeddings.space, __version__)
    rows = pool.filter(predicate(sub)).drop("status").with_columns(recipe_id=pl.lit(recipe["recipe_id"]))
    report = _gate(subset_table(sub.name), shard, rows.select("uid", "url"), quality.subset_suite(raw.height))
    stats = {"recipe": recipe, "candidates": pool.filter(pl.col("status") == "success").height, "kept": rows.height}
    stats["kept_fraction"] = round(rows.height / max(1, stats["candidates"]), 4)
    return _publish(lake, subset_table(sub.name), shard, rows, report, stats, {"recipe": json.dumps(recipe, sort_keys=True)})
