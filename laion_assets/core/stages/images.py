"""images: every URL of a shard downloaded, decoded, resized and re-encoded; staged in chunks for resume."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from laion_assets.core.config import PipelineConfig
from laion_assets.core.images import adopt
from laion_assets.core.images.download import IMAGES_SCHEMA, STATUS_FIXES, STATUSES, Progress, ShardDownloader
from laion_assets.core.images.timeline import note_timeline
from laion_assets.core.ingest import registry
from laion_assets.core.ingest.img2dataset import PREFIX, I2dShard
from laion_assets.core.lake import quality
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import (
    LaionAssetsError,
    StagingUnusable,
    ValidationFailed,
    explained,
)
from laion_assets.core.lake.tables import IMAGES, RAW_URLS, STAGING_IMAGES
from laion_assets.core.stages import fingerprints, staging
from laion_assets.core.stages.publish import StageOutput, gate, publish_stream
from laion_assets.core.stages.subsets import before_fetch

log = logging.getLogger(__name__)


@explained
def run_images(
    lake: Lake, cfg: PipelineConfig, shard: str, *, retry_failures: bool = False,
    on_progress: Callable[[Progress], None] | None = None, resolver=None,
) -> StageOutput:
    """Download a shard. Chunks are staged as they finish, so a killed run resumes where it
    stopped; `retry_failures` re-fetches only the published rows whose failure is retryable.

    Memory stays bounded: image bytes go from the downloader to staging chunk by chunk, the
    gate reads the staged rows back batch by batch, and the publish streams them to Delta.
    Staging that cannot be read back intact (a truncated file, bytes that no longer match
    their checksum) is dropped and the shard downloaded once more. A shard adopted from an
    img2dataset download is read from its folder instead: no request is made.
    """
    if found := registry.adoption(lake, shard):
        return _adopt_images(lake, cfg, shard, I2dShard(**found["img2dataset"]))
    try:
        return _run_images(lake, cfg, shard, retry_failures, on_progress, resolver)
    except StagingUnusable as e:
        staging.drop(lake, STAGING_IMAGES, shard, str(e))
        return _run_images(lake, cfg, shard, retry_failures, on_progress, resolver)


def _run_images(lake: Lake, cfg: PipelineConfig, shard: str, retry_failures: bool, on_progress, resolver) -> StageOutput:
    raw = lake.read_shard(RAW_URLS, shard, ["uid", "url", *_boxes_column(lake, cfg)])
    selected = {}
    if cfg.download.only_subset:  # filter before fetch: only the rows that can pass the subset
        chosen, dropped = before_fetch(lake, cfg, shard)
        selected = {"only_subset": {"subset": cfg.download.only_subset, "rows": chosen.len(), "of": raw.height, "dropped_by_rule": dropped}}
        raw = raw.filter(pl.col("uid").is_in(chosen.implode()))
    recipe = fingerprints.current(lake, cfg, IMAGES, shard, gate=False)
    staged = staging.usable(lake, STAGING_IMAGES, shard, recipe, {"uid": pl.Int64, "retryable": pl.Boolean})
    if staged["retryable"].fill_null(False).any():  # fetched again: dropped first, so a uid is staged once
        with staging.readable(STAGING_IMAGES, shard):
            lake.delete_where(STAGING_IMAGES, f"shard = '{shard}' AND retryable = true")
        staged = staged.filter(~pl.col("retryable").fill_null(False))
    kept = pl.DataFrame(schema={"uid": pl.Int64})
    if retry_failures and lake.exists(IMAGES) and lake.shard_row_count(IMAGES, shard):
        kept = (
            lake.read_shard(IMAGES, shard, ["uid", "retryable"])
            .filter(~pl.col("retryable").fill_null(False) & pl.col("uid").is_in(raw["uid"].implode()) & ~pl.col("uid").is_in(staged["uid"].implode()))
            .select("uid")
        )
    elif retry_failures:
        log.info("shard %s: nothing published yet to retry: a plain download (staged rows resume)", shard)
    done = pl.concat([kept["uid"], staged["uid"]])
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

    rows = _audit_rows(lake, shard, kept["uid"] if retry_failures else None)
    broken = rows.filter(pl.col("from_staging") & ~pl.col("image_intact")).height
    if broken:
        raise StagingUnusable(f"{broken} staged images of shard '{shard}' do not match the checksum taken when they were encoded", STAGING_IMAGES)
    audit = rows.select(
        "uid", "status", "image_intact", pl.col("width").fill_null(1),
        is_success=pl.col("status") == "success",
        has_image_iff_success=(pl.col("status") == "success") == pl.col("stored").is_not_null(),
    )
    counts = dict(rows.group_by("status").len().sort("status").iter_rows())
    stats = {
        "status_counts": counts, "success_rate": round(counts.get("success", 0) / max(1, rows.height), 4),
        "top_errors": top_errors(rows, raw), "fetched_this_run": progress.done, "resumed_rows": done.len(),
        "bytes_downloaded": int(rows["bytes_downloaded"].fill_null(0).sum()),
        "bytes_stored": int(rows["stored"].fill_null(0).sum()),
        "duration_s": round(elapsed, 2), "images_per_s": round(progress.done / max(elapsed, 1e-9), 1), **selected,
    }
    try:
        report = gate(IMAGES, shard, audit, quality.images_suite(raw.height, STATUSES, cfg.download.min_success_rate), stats)
    except ValidationFailed as e:
        staging.drop(lake, STAGING_IMAGES, shard, "the shard failed its gate")
        raise ValidationFailed(e.stage, e.shard, [*e.failures, why_not_stored(counts)], e.report, e.stats) from None
    batches = [staging.guarded(lake.batches(STAGING_IMAGES, shard, IMAGES_SCHEMA.names), STAGING_IMAGES, shard)]
    if retry_failures:
        batches.append(lake.batches(IMAGES, shard, IMAGES_SCHEMA.names, uids=kept["uid"].to_list()))
    published = time.monotonic()
    out = publish_stream(
        lake, IMAGES, shard, IMAGES_SCHEMA, (b for part in batches for b in part), rows.height,
        report, stats, {"recipe": recipe}, STAGING_IMAGES, fingerprints.current(lake, cfg, IMAGES, shard),
    )
    note_timeline(phase="audit_gate", s=round(published - started - elapsed, 2))
    note_timeline(phase="publish", s=round(time.monotonic() - published, 2))
    return out


def why_not_stored(counts: dict[str, int], n: int = 3) -> str:
    """'not stored: refused_address 300 of 300 (the hosts resolve to ...: add their networks to
    download.allowed_networks ...)': the commonest failure statuses and what to change."""
    total = sum(counts.values())
    failed = sorted(((v, k) for k, v in counts.items() if k != "success" and v), reverse=True)[:n]
    return "not stored: " + ", ".join(f"{k} {v} of {total} ({STATUS_FIXES[k]})" for v, k in failed)


def _boxes_column(lake: Lake, cfg: PipelineConfig) -> list[str]:
    """The raw_urls column of boxes to blur (images.bbox_col), checked to exist."""
    col = cfg.images.bbox_col
    if col is None:
        return []
    names = lake.scan(RAW_URLS).collect_schema().names()
    if col not in names:
        raise LaionAssetsError(f"images.bbox_col '{col}' is not a raw_urls column (it has {', '.join(names)}): name the column of boxes to blur")
    return [col]


def _adopt_images(lake: Lake, cfg: PipelineConfig, shard: str, i2d: I2dShard) -> StageOutput:
    """The images img2dataset stored for the shard, checked and published as they are."""
    started = time.monotonic()
    raw = lake.read_shard(RAW_URLS, shard)
    rows = adopt.check(i2d, raw.select("uid", "url", pl.col(f"^{PREFIX}.*$")), cfg.images)
    audit = rows.select(
        "uid", "status", image_intact=pl.lit(True), width=pl.col("width").fill_null(1),
        is_success=pl.col("status") == "success", has_image_iff_success=(pl.col("status") == "success") == pl.col("stored").is_not_null(),
    )
    counts = dict(rows.group_by("status").len().sort("status").iter_rows())
    elsewise = rows.filter(~pl.col("as_configured")).height
    if elsewise:
        log.warning("shard %s: %d images stored by img2dataset at another size or format than images: %s, kept as they are",
                    shard, elsewise, cfg.images.model_dump(include={"size", "resize_mode", "format"}))
    stats = {
        "adopted_from": i2d.container, "img2dataset_format": i2d.format, "requests_made": 0,
        "status_counts": counts, "success_rate": round(counts.get("success", 0) / max(1, rows.height), 4),
        "top_errors": top_errors(rows, raw), "stored_formats": dict(rows.group_by("ext").len().drop_nulls().sort("ext").iter_rows()),
        "kept_as_stored": elsewise, "bytes_stored": int(rows["stored"].fill_null(0).sum()),
        "duration_s": round(time.monotonic() - started, 2),
    }
    report = gate(IMAGES, shard, audit, quality.images_suite(raw.height, STATUSES, cfg.download.min_success_rate), stats)
    return publish_stream(
        lake, IMAGES, shard, IMAGES_SCHEMA, adopt.batches(i2d, rows), rows.height, report, stats,
        {"adopted_from": i2d.container}, STAGING_IMAGES, fingerprints.current(lake, cfg, IMAGES, shard),
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


AUDIT_COLUMNS = ["uid", "status", "error", "width", "bytes_downloaded", "image", "image_sha256"]


def _audit_rows(lake: Lake, shard: str, kept: pl.Series | None) -> pl.DataFrame:
    """The rows to publish without their bytes (staged ones, and the kept published ones on a
    retry), read batch by batch; each stored image is checked against its checksum."""
    parts = []
    sources = [(STAGING_IMAGES, None)] + ([(IMAGES, kept.to_list())] if kept is not None else [])
    for table, uids in sources:
        batches = lake.batches(table, shard, AUDIT_COLUMNS, uids=uids)
        for b in staging.guarded(batches, table, shard) if table == STAGING_IMAGES else batches:
            images, sums = b["image"].to_pylist(), b["image_sha256"].to_pylist()
            intact = [img is None or want is None or hashlib.sha256(img).hexdigest() == want for img, want in zip(images, sums)]
            parts.append(pl.from_arrow(b.drop_columns(["image", "image_sha256"])).with_columns(
                stored=pl.from_arrow(pc.binary_length(b["image"])), image_intact=pl.Series(intact),
                from_staging=pl.lit(table == STAGING_IMAGES),
            ))
    if not parts:
        return pl.DataFrame(schema={"uid": pl.Int64, "status": pl.String, "error": pl.String, "width": pl.Int32,
                                    "bytes_downloaded": pl.Int64, "stored": pl.Int32, "image_intact": pl.Boolean, "from_staging": pl.Boolean})
    return pl.concat(parts)
