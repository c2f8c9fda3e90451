"""embeddings: CLIP image and text embeddings of a shard's successful images, one table per
configured space, all spaces computed in one streamed pass that decodes each image once."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from laion_assets.core import quality, vectors
from laion_assets.core.config import PipelineConfig
from laion_assets.core.errors import ValidationFailed
from laion_assets.core.lake import Lake
from laion_assets.core.stages import watermark as watermark_stage
from laion_assets.core.stages.publish import (
    IMAGES, RAW_URLS, StageOutput, chunked, embeddings_table, gate, publish_stream, recipe_hash,
    staging_embeddings, uids,
)

log = logging.getLogger(__name__)


def run_embeddings(
    lake: Lake, cfg: PipelineConfig, shard: str, encoder_factory: Callable[[Sequence[str]], object],
    spaces: Sequence[str] | None = None, watermark: bool = False,
) -> dict[str, StageOutput | ValidationFailed]:
    """Image and text embeddings of the successful images in each of `spaces` (default: every
    configured space), in memory bounded for any shard size: images are read in record batches
    and encoded `chunk_rows` at a time by one Encoder holding every space's tower (each image
    decoded once), each chunk staged per space as soon as it is done (a killed run resumes after
    the last staged chunk); each space is then audited on its staged vectors and, if it passes,
    published as a stream in one Delta commit. Returns per space its output or its failed gate.

    `encoder_factory(spaces)` returns an Encoder whose towers are those spaces' models, in order.
    With `watermark`, the watermark classifier is one more tower (named "watermark", last): its
    pwatermark is staged and published the same way, as the `watermark` table.
    """
    ecfg = cfg.embeddings
    spaces = list(ecfg.spaces if spaces is None else spaces)
    # Staged chunks are reused only for the same model config and the same published images:
    # any republish of the images shard writes new files, so its file list identifies the bytes.
    images_files = "\n".join(lake.shard_files(IMAGES, shard))
    keys = {}
    for space in spaces:
        recipe = recipe_hash(ecfg.spaces[space], ecfg.model_copy(update={"spaces": {}}))
        keys[space] = hashlib.sha256(f"{recipe}\n{images_files}".encode()).hexdigest()[:16]
        lake.delete_where(staging_embeddings(space), f"shard = '{shard}' AND recipe <> '{keys[space]}'")
    if watermark:
        wm_key = watermark_stage.staging_key(cfg, images_files)
        lake.delete_where(watermark_stage.STAGING, f"shard = '{shard}' AND recipe <> '{wm_key}'")
    success = uids(lake, IMAGES, shard, pl.col("status") == "success")
    staged = {space: uids(lake, staging_embeddings(space), shard) for space in spaces}
    if watermark:
        staged_wm = uids(lake, watermark_stage.STAGING, shard)
    sets = [set(s.to_list()) for s in staged.values()] + ([set(staged_wm.to_list())] if watermark else [])
    everywhere = pl.Series("uid", sorted(set.intersection(*sets)), pl.Int64)
    total = success.len() - everywhere.len()
    if everywhere.len():
        log.info("shard %s: %d images resumed in every space, %d to compute", shard, everywhere.len(), total)
    captions = lake.read_shard(RAW_URLS, shard, ["uid", "caption"])
    encoder = encoder_factory(spaces + (["watermark"] if watermark else []))
    todo = (
        pl.from_arrow(b).filter((pl.col("status") == "success") & ~pl.col("uid").is_in(everywhere.implode()))
        for b in lake.batches(IMAGES, shard, ["uid", "status", "image"])
    )
    started, done = time.monotonic(), 0
    for chunk in chunked(todo, ecfg.chunk_rows):
        chunk = chunk.join(captions, on="uid", how="left", maintain_order="left")
        vecs = encoder.encode(chunk["image"].to_list())
        for k, space in enumerate(spaces):
            missing = ~chunk["uid"].is_in(staged[space].implode()).to_numpy()
            if not missing.any():
                continue
            part = chunk.filter(pl.Series(missing))
            img, txt = vecs[k][missing], encoder.texts(part["caption"].to_list(), k)
            lake.append(staging_embeddings(space), pa.table({
                "uid": part["uid"].to_arrow(),
                "image_embedding": vectors.to_column(img, ecfg.dtype),
                "text_embedding": vectors.to_column(txt, ecfg.dtype),
                "similarity": pa.array((img * txt).sum(axis=1).astype(np.float32)),
                "recipe": pa.array([keys[space]] * part.height, pa.string()),
            }), shard=shard)
        if watermark:
            missing = ~chunk["uid"].is_in(staged_wm.implode()).to_numpy()
            if missing.any():
                watermark_stage.stage(lake, shard, chunk["uid"].filter(pl.Series(missing)), vecs[len(spaces)][missing, 0], wm_key)
        done += chunk.height
        rate = done / max(time.monotonic() - started, 1e-9)
        log.info("shard %s: embedded %d/%d in %d space(s) (%.1f images/s)", shard, done, total, len(spaces), rate)
    elapsed = time.monotonic() - started
    run_stats = {"duration_s": round(elapsed, 2), "images_per_s": round(done / max(elapsed, 1e-9), 1), "spaces_in_pass": spaces}
    out: dict[str, StageOutput | ValidationFailed] = {}
    for k, space in enumerate(spaces):
        try:
            out[space] = _audit_and_publish(lake, cfg, shard, space, encoder.towers[k], success.len(), staged[space].len(), run_stats)
        except ValidationFailed as e:
            out[space] = e
    if watermark:
        try:
            out["watermark"] = watermark_stage.publish(lake, shard, encoder.towers[len(spaces)], success.len(), staged_wm.len(), run_stats)
        except ValidationFailed as e:
            out["watermark"] = e
    return out


def _audit_and_publish(lake: Lake, cfg: PipelineConfig, shard: str, space: str, model, expected: int, resumed: int, run_stats: dict) -> StageOutput:
    """Gate one space's staged vectors (count, uniqueness, norms, similarity range), then
    publish them as `embeddings/<space>` with the space's identity on every row."""
    ecfg, staging = cfg.embeddings, staging_embeddings(space)
    columns = ["uid", "image_embedding", "text_embedding", "similarity"]
    audit = [
        pl.from_arrow(b).select(
            "uid", "similarity",
            image_norm=pl.lit(np.linalg.norm(vectors.from_arrow(b["image_embedding"], model.dim), axis=1)),
            text_norm=pl.lit(np.linalg.norm(vectors.from_arrow(b["text_embedding"], model.dim), axis=1)),
        )
        for b in lake.batches(staging, shard, columns)
    ]
    audit = pl.concat(audit) if audit else pl.DataFrame(schema={"uid": pl.Int64, "similarity": pl.Float32, "image_norm": pl.Float32, "text_norm": pl.Float32})
    table = embeddings_table(space)
    stats = {
        "space": space, **model.describe(), "dtype": ecfg.dtype, "images": expected, "resumed_rows": resumed,
        "mean_similarity": round(float(audit["similarity"].mean() or 0), 4), **run_stats,
    }
    if model.meaningless:
        stats["WARNING"] = f"{model.name} is a random model: embeddings and similarities are meaningless"
    report = gate(table, shard, audit, quality.embeddings_suite(expected, cfg.quality.embedding_norm_tolerance), stats)
    vec = vectors.arrow_type(ecfg.dtype)
    schema = pa.schema([("uid", pa.int64()), ("image_embedding", vec), ("text_embedding", vec),
                        ("similarity", pa.float32()), ("embedding_space", pa.string())])
    published = (
        b.append_column("embedding_space", pa.array([model.space] * b.num_rows, pa.string()))
        for b in lake.batches(staging, shard, columns)
    )
    return publish_stream(
        lake, table, shard, schema, published, audit.height, report, stats,
        {"space": space, "embedding_space": model.space, "recipe": recipe_hash(ecfg.spaces[space])}, staging,
    )
