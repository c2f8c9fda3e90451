"""embeddings: CLIP image and text embeddings of a shard's successful images, streamed and staged."""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import polars as pl
import pyarrow as pa

from laion_assets.core import quality, vectors
from laion_assets.core.config import PipelineConfig
from laion_assets.core.lake import Lake
from laion_assets.core.stages.publish import (
    EMBEDDINGS, IMAGES, RAW_URLS, STAGING_EMBEDDINGS, StageOutput, chunked, gate, publish_stream,
    recipe_hash, uids,
)

log = logging.getLogger(__name__)


def run_embeddings(lake: Lake, cfg: PipelineConfig, shard: str, encoder_factory) -> StageOutput:
    """CLIP image and text embeddings for the successful images, in memory bounded for any
    shard size: images are read in record batches and encoded `chunk_rows` at a time, each
    chunk staged as soon as it is done (a killed run resumes after the last staged chunk);
    the audit reads the staged vectors back batch by batch and the publish streams them into
    one Delta commit."""
    ecfg = cfg.embeddings
    recipe = recipe_hash(ecfg)
    # Staged chunks are reused only for the same config and the same published images: any
    # republish of the images shard writes new files, so its file list identifies the bytes.
    images_files = "\n".join(lake.shard_files(IMAGES, shard))
    stage_key = hashlib.sha256(f"{recipe}\n{images_files}".encode()).hexdigest()[:16]
    lake.delete_where(STAGING_EMBEDDINGS, f"shard = '{shard}' AND recipe <> '{stage_key}'")
    success = uids(lake, IMAGES, shard, pl.col("status") == "success")
    staged = uids(lake, STAGING_EMBEDDINGS, shard)  # all of them successes of these images
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
    for chunk in chunked(todo, ecfg.chunk_rows):
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
    report = gate(EMBEDDINGS, shard, audit, quality.embeddings_suite(success.len(), cfg.quality.embedding_norm_tolerance))
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
    return publish_stream(
        lake, EMBEDDINGS, shard, schema, published, audit.height, report, stats,
        {"embedding_space": model.space, "recipe": recipe}, STAGING_EMBEDDINGS,
    )
