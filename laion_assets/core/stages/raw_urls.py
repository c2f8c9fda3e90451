"""raw_urls: one input shard file read, normalised, given LAION uids, audited and published.

Every input row ends in exactly one of two tables: raw_urls (kept: a fetchable URL, first of
its uid) or raw_urls_rejected (kept out, with the reason and the original values). Both carry
`source_row`, so "what happened to input row N" is one lookup; the gate checks that kept plus
kept-out rows are the input rows, each once.
"""

from __future__ import annotations

import logging

import polars as pl

from laion_assets.core.config import PipelineConfig
from laion_assets.core.ingest import registry
from laion_assets.core.ingest.img2dataset import I2dShard, input_frame
from laion_assets.core.ingest.reader import REASONS, IngestResult, normalize, read_shard_file
from laion_assets.core.lake import quality
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError, ValidationFailed, explained
from laion_assets.core.lake.tables import IMAGES, RAW_URLS
from laion_assets.core.stages import fingerprints
from laion_assets.core.stages.publish import StageOutput, gate, publish

RAW_URLS_REJECTED = "raw_urls_rejected"

log = logging.getLogger(__name__)


def audit_frame(res: IngestResult) -> pl.DataFrame:
    """Every input row once: kept rows with their uid and fetch URL, kept-out rows with their
    reason (uid as text: pandas would turn a nullable int64 into lossy floats)."""
    return pl.concat([
        res.rows.select(
            "source_row", pl.col("uid").cast(pl.String), "fetch_url",
            kept=pl.lit(True), kept_out_reason=pl.lit(None, pl.String),
        ),
        res.rejected.select(
            "source_row", uid=pl.lit(None, pl.String), fetch_url=pl.lit(None, pl.String),
            kept=pl.lit(False), kept_out_reason="reason",
        ),
    ])


def why_kept_out(res: IngestResult) -> str:
    """'kept out: malformed_url 6 of 6 (URL column holds Int64 values, not text)': counts and
    the most common detail per reason, for a gate failure message."""
    top = (
        res.rejected.group_by("reason", "detail").len().sort("len", descending=True)
        .group_by("reason", maintain_order=True).agg(pl.col("detail").first(), pl.col("len").sum())
    )
    parts = [f"{r} {n} of {res.input_rows} (e.g. {d})" for r, d, n in top.iter_rows()]
    return "kept out: " + ", ".join(parts)


@explained
def run_raw_urls(lake: Lake, cfg: PipelineConfig, shard: str) -> StageOutput:
    fingerprint = fingerprints.current(lake, cfg, RAW_URLS, shard)
    source = registry.source_of(lake, shard)
    try:
        found = registry.adoption(lake, shard)
        rows = input_frame(I2dShard(**found["img2dataset"])) if found else read_shard_file(source)
        res = normalize(rows, source)
        stats = {
            "source": source, "input_rows": res.input_rows, "rows": res.rows.height, "kept_out": res.kept_out,
            "kept_out_table": lake.table_uri(RAW_URLS_REJECTED), "renamed_columns": res.renamed,
        }
        suite = quality.raw_urls_suite(res.input_rows, REASONS, cfg.ingest.min_usable_rate)
        try:
            report = gate(RAW_URLS, shard, audit_frame(res), suite, stats)
        except ValidationFailed as e:
            raise ValidationFailed(e.stage, e.shard, [*e.failures, why_kept_out(res)], e.report, e.stats) from None
    except LaionAssetsError:
        registry.release(lake, shard)  # a refused file does not stay registered
        raise
    for reason, n in res.kept_out.items():
        if n:
            log.warning("shard %s: %d of %d rows kept out: %s (see %s)", shard, n, res.input_rows, reason, RAW_URLS_REJECTED)
    # Kept-out rows first: once raw_urls shows the shard, its rejected rows are there too.
    lake.publish_shard(RAW_URLS_REJECTED, shard, res.rejected, metadata={"stage": RAW_URLS, "source": source})
    return publish(lake, RAW_URLS, shard, res.rows, report, stats, {"source": source}, fingerprint)


def input_row_fates(lake: Lake, shard: str) -> pl.DataFrame:
    """What happened to every input row of a shard, by `source_row`: `outcome` is the images
    status of a kept row (null until images ran) or the reason a row was kept out; `detail`
    the error or the reason's detail."""
    def read(table: str, columns: dict) -> pl.DataFrame:
        found = lake.read_shard_or_none(table, shard, list(columns))
        return pl.DataFrame(schema=columns) if found is None else found

    kept = lake.read_shard(RAW_URLS, shard, ["source_row", "uid"])
    images = read(IMAGES, {"uid": pl.Int64, "status": pl.String, "error": pl.String})
    rejected = read(RAW_URLS_REJECTED, {"source_row": pl.Int64, "uid": pl.Int64, "reason": pl.String, "detail": pl.String})
    return pl.concat([
        kept.join(images, on="uid", how="left").select(
            "source_row", "uid", stage=pl.lit("images"), outcome="status", detail="error"
        ),
        rejected.select("source_row", "uid", stage=pl.lit("raw_urls"), outcome="reason", detail="detail"),
    ]).sort("source_row")
