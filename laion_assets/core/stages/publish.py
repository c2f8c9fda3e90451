"""Write-audit-publish, shared by every stage: the gate, the publish (whole frame or staged
stream), the stage output the UI shows, and small helpers over staged chunks.

A shard that fails its suite raises ValidationFailed (carrying the report and the stage's
figures) and is never published."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from laion_assets import __version__
from laion_assets.core.lake import quality
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import ValidationFailed
from laion_assets.core.stages import fingerprints


@dataclass
class StageOutput:
    rows: int
    version: int
    schema: pa.Schema
    report: quality.Report
    stats: dict = field(default_factory=dict)
    preview: pl.DataFrame | None = None


def gate(stage: str, shard: str, df: pl.DataFrame, suite: list[quality.Expectation], stats: dict | None = None) -> quality.Report:
    """Validate; on failure raise with the report and the stage's `stats`, so the cause shows."""
    report = quality.validate(stage, shard, df, suite)
    if not report.success:
        raise ValidationFailed(stage, shard, report.failures(), report, stats)
    return report


def publish(lake: Lake, table: str, shard: str, df: pl.DataFrame, report, stats, meta=None, fingerprint: str | None = None,
            base: str | None = None) -> StageOutput:
    """Replace the shard in one commit, then record what it was made from (`fingerprint`; a
    subset's `base` too: see fingerprints.after_pass)."""
    df = df.drop("shard", strict=False)
    version = lake.publish_shard(table, shard, df, metadata=_commit_meta(table, meta, fingerprint))
    fingerprints.record(lake, table, shard, fingerprint, version, base=base)
    return StageOutput(df.height, version, df.to_arrow().schema, report, stats, preview(df))


def publish_stream(
    lake: Lake, table: str, shard: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch],
    rows: int, report, stats, meta: dict, staging: str, fingerprint: str | None = None,
) -> StageOutput:
    """`publish` for a stream of staged batches (bounded memory). Then, in this order, the
    fingerprint is recorded and the shard's staging removed: a kill in between leaves staging
    that the next run drops as garbage, never a published shard without its record."""
    reader = pa.RecordBatchReader.from_batches(schema, (b.cast(schema) for b in batches))
    version = lake.publish_stream(table, shard, reader, metadata=_commit_meta(table, meta, fingerprint))
    fingerprints.record(lake, table, shard, fingerprint, version, meta.get("recipe"))
    lake.drop_shard(staging, shard)
    return StageOutput(rows, version, schema, report, stats, preview(lake.scan(table).filter(pl.col("shard") == shard).head(5).collect()))


def _commit_meta(table: str, meta: dict | None, fingerprint: str | None) -> dict:
    return {"stage": table, "code_version": __version__, **(meta or {}), **({"fingerprint": fingerprint} if fingerprint else {})}


def preview(df: pl.DataFrame, rows: int = 5) -> pl.DataFrame:
    """The first rows without bytes or vectors, long strings cut: for a look in the UI."""
    cols = [c for c, t in df.schema.items() if t not in (pl.Binary,) and not isinstance(t, (pl.List, pl.Array))]
    return df.head(rows).select(cols).with_columns(pl.col(pl.String).str.slice(0, 80))


def chunked(frames: Iterable[pl.DataFrame], rows: int) -> Iterator[pl.DataFrame]:
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


def uids(lake: Lake, table: str, shard: str, where: pl.Expr | bool = True) -> pl.Series:
    if not lake.exists(table):
        return pl.Series("uid", [], pl.Int64)
    return lake.scan(table).filter((pl.col("shard") == shard) & where).select("uid").collect()["uid"]
