"""watermark: pwatermark of a shard's successful images, computed by the embeddings pass (the
classifier is one more tower of its Encoder: each image is decoded once for CLIP and for it),
staged per chunk like the embeddings and published as its own table."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from laion_assets.core.config import PipelineConfig
from laion_assets.core.lake import quality
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import StagingUnusable
from laion_assets.core.lake.tables import WATERMARK
from laion_assets.core.stages import fingerprints, staging
from laion_assets.core.stages.publish import StageOutput, gate, publish_stream

STAGING = "_staging/watermark"
SCHEMA = pa.schema([("uid", pa.int64()), ("pwatermark", pa.float32()), ("watermark_model", pa.string())])


def stage(lake: Lake, shard: str, uids: pl.Series, pwatermark: np.ndarray, key: str) -> None:
    chunk = pa.table({
        "uid": uids.to_arrow(), "pwatermark": pa.array(pwatermark.astype(np.float32)),
        "recipe": pa.array([key] * len(uids), pa.string()),
    })
    lake.append(STAGING, chunk.append_column("checksum", staging.checksums(chunk, ["uid", "pwatermark"])), shard=shard)


def publish(lake: Lake, cfg: PipelineConfig, shard: str, model, expected: int, resumed: int, run_stats: dict, recipe: str) -> StageOutput:
    """Gate the staged scores (one per successful image, in [0, 1]) and publish them with the
    model's identity on every row; an untrained model is said so in the metadata. Staged rows
    are `recipe`'s (the watermark's fingerprint without its gate: staging.usable saw to it)."""
    audit = staging.read(lake, STAGING, shard, {"uid": pl.Int64, "pwatermark": pl.Float32, "checksum": pl.String})
    damaged = staging.damaged(audit.to_arrow(), ["uid", "pwatermark"])
    if damaged:
        raise StagingUnusable(f"{damaged} staged rows of shard '{shard}' in {STAGING} do not match the checksum taken when they were staged", STAGING)
    stats = {
        **model.describe(), "images": expected, "resumed_rows": resumed, **run_stats,
        "mean_pwatermark": round(float(audit["pwatermark"].mean() or 0), 4),
        "share_at_least_0.8": round(float((audit["pwatermark"] >= 0.8).mean() or 0), 4),
    }
    report = gate(WATERMARK, shard, audit, quality.watermark_suite(expected), stats)
    batches = (
        b.select(["uid", "pwatermark"]).append_column("watermark_model", pa.array([model.identity] * b.num_rows, pa.string()))
        for b in staging.guarded(lake.batches(STAGING, shard, ["uid", "pwatermark"]), STAGING, shard)
    )
    meta = {
        "watermark_model": model.identity, "checkpoint": model.checkpoint or "", "sha256": model.sha256 or "",
        "trained": str(model.trained), "recipe": recipe,
    }
    return publish_stream(
        lake, WATERMARK, shard, SCHEMA, batches, audit.height, report, stats, meta, STAGING,
        fingerprints.current(lake, cfg, WATERMARK, shard),
    )
