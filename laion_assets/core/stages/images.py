"""images: every URL of a shard downloaded, decoded, resized and re-encoded; staged in chunks for resume."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import polars as pl
import pyarrow as pa

from laion_assets.core import quality
from laion_assets.core.config import PipelineConfig
from laion_assets.core.download import IMAGES_SCHEMA, STATUSES, Progress, ShardDownloader
from laion_assets.core.errors import LaionAssetsError
from laion_assets.core.lake import Lake
from laion_assets.core.stages.publish import (
    IMAGES, RAW_URLS, STAGING_IMAGES, StageOutput, gate, publish_stream, recipe_hash,
)

log = logging.getLogger(__name__)


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
    recipe = recipe_hash(cfg.images)
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
    counts = dict(rows.group_by("status").len().sort("status").iter_rows())
    stats = {
        "status_counts": counts, "success_rate": round(counts.get("success", 0) / max(1, rows.height), 4),
        "top_errors": top_errors(rows, raw), "fetched_this_run": progress.done, "resumed_rows": done.len(),
        "bytes_downloaded": int(rows["bytes_downloaded"].fill_null(0).sum()),
        "bytes_stored": int(rows["stored"].fill_null(0).sum()),
        "duration_s": round(elapsed, 2), "images_per_s": round(progress.done / max(elapsed, 1e-9), 1),
    }
    report = gate(IMAGES, shard, audit, quality.images_suite(raw.height, STATUSES, cfg.download.min_success_rate), stats)
    batches = [lake.batches(STAGING_IMAGES, shard, IMAGES_SCHEMA.names)]
    if retry_failures:
        batches.append(lake.batches(IMAGES, shard, IMAGES_SCHEMA.names, uids=kept["uid"].to_list()))
    return publish_stream(
        lake, IMAGES, shard, IMAGES_SCHEMA, (b for part in batches for b in part), rows.height,
        report, stats, {"recipe": recipe}, STAGING_IMAGES,
    )


def top_errors(rows: pl.DataFrame, raw: pl.DataFrame, n: int = 10) -> dict[str, dict]:
    """The most frequent failures (error cut to 60 characters): rows, status and one example URL."""
    top = (
        rows.filter(pl.col("status") != "success")
        .join(raw.select("uid", "url"), on="uid", how="left")
        .group_by(error=pl.col("error").fill_null("").str.slice(0, 60))
        .agg(rows=pl.len(), status=pl.col("status").first(), example_url=pl.col("url").first())
        .sort("rows", "error", descending=[True, False])
        .head(n)
    )
    return {r.pop("error"): r for r in top.iter_rows(named=True)}
