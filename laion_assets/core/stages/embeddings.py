"""embeddings: CLIP image and text embeddings of a shard's successful images, one table per
configured space, all spaces computed in one streamed pass that decodes each image once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from laion_assets.core.config import PipelineConfig
from laion_assets.core.embeddings import vectors
from laion_assets.core.lake import quality
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import StagingUnusable, ValidationFailed, explained
from laion_assets.core.lake.tables import IMAGES, RAW_URLS, WATERMARK, embeddings_table, staging_embeddings
from laion_assets.core.stages import fingerprints, staging
from laion_assets.core.stages import watermark as watermark_stage
from laion_assets.core.stages.publish import StageOutput, chunked, gate, publish_stream, uids

log = logging.getLogger(__name__)
VALUES = ["uid", "image_embedding", "text_embedding", "similarity"]  # what a staged row's checksum covers


@explained
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
    A tower whose staging cannot be read back intact is dropped and computed once more (with
    the towers not published yet, whose staging is reused).

    `encoder_factory(spaces)` returns an Encoder whose towers are those spaces' models, in order.
    With `watermark`, the watermark classifier is one more tower (named "watermark", last): its
    pwatermark is staged and published the same way, as the `watermark` table.
    """
    spaces = list(cfg.embeddings.spaces if spaces is None else spaces)
    try:
        return _run_embeddings(lake, cfg, shard, encoder_factory, spaces, watermark)
    except _TowerUnusable as e:
        staging.drop(lake, staging.table_for(WATERMARK if e.tower == "watermark" else embeddings_table(e.tower)), shard, str(e.error))
        again = _run_embeddings(lake, cfg, shard, encoder_factory, [s for s in spaces if s not in e.done], watermark and "watermark" not in e.done)
        return {**e.done, **again}


class _TowerUnusable(Exception):
    def __init__(self, tower: str, error: StagingUnusable, done: dict):
        self.tower, self.error, self.done = tower, error, done


def _run_embeddings(lake, cfg, shard, encoder_factory, spaces, watermark) -> dict[str, StageOutput | ValidationFailed]:
    ecfg = cfg.embeddings
    # Staged chunks are reused only for the same fingerprint: the same model config and the same
    # published images (a republish of the images shard writes new files).
    tables = {space: embeddings_table(space) for space in spaces} | ({"watermark": WATERMARK} if watermark else {})
    recipes = {tower: fingerprints.current(lake, cfg, table, shard, gate=False) for tower, table in tables.items()}
    staged = {tower: staging.usable(lake, staging.table_for(table), shard, recipes[tower])["uid"] for tower, table in tables.items()}
    success = uids(lake, IMAGES, shard, pl.col("status") == "success")
    everywhere = pl.Series("uid", sorted(set.intersection(*(set(s.to_list()) for s in staged.values()))), pl.Int64)
    total = success.len() - everywhere.len()
    if everywhere.len():
        log.info("shard %s: %d images resumed in every space, %d to compute", shard, everywhere.len(), total)
    captions = lake.read_shard(RAW_URLS, shard, ["uid", "caption"])
    encoder = encoder_factory(list(tables))
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
            staged_chunk = pa.table({
                "uid": part["uid"].to_arrow(),
                "image_embedding": vectors.to_column(img, ecfg.dtype),
                "text_embedding": vectors.to_column(txt, ecfg.dtype),
                "similarity": pa.array((img * txt).sum(axis=1).astype(np.float32)),
                "recipe": pa.array([recipes[space]] * part.height, pa.string()),
            })
            lake.append(staging_embeddings(space), staged_chunk.append_column("checksum", staging.checksums(staged_chunk, VALUES)), shard=shard)
        if watermark:
            missing = ~chunk["uid"].is_in(staged["watermark"].implode()).to_numpy()
            if missing.any():
                watermark_stage.stage(lake, shard, chunk["uid"].filter(pl.Series(missing)), vecs[len(spaces)][missing, 0], recipes["watermark"])
        done += chunk.height
        rate = done / max(time.monotonic() - started, 1e-9)
        log.info("shard %s: embedded %d/%d in %d space(s) (%.1f images/s)", shard, done, total, len(spaces), rate)
    elapsed = time.monotonic() - started
    run_stats = {"duration_s": round(elapsed, 2), "images_per_s": round(done / max(elapsed, 1e-9), 1), "spaces_in_pass": spaces}
    out: dict[str, StageOutput | ValidationFailed] = {}
    for k, tower in enumerate(tables):
        try:
            if tower == "watermark":
                out[tower] = watermark_stage.publish(lake, cfg, shard, encoder.towers[k], success.len(), staged[tower].len(), run_stats, recipes[tower])
            else:
                out[tower] = _audit_and_publish(lake, cfg, shard, tower, encoder.towers[k], success.len(), staged[tower].len(), run_stats, recipes[tower])
        except ValidationFailed as e:
            staging.drop(lake, staging.table_for(tables[tower]), shard, "the shard failed its gate")
            out[tower] = e
        except StagingUnusable as e:
            raise _TowerUnusable(tower, e, out) from e
    return out


def _audit_and_publish(
    lake: Lake, cfg: PipelineConfig, shard: str, space: str, model, expected: int, resumed: int, run_stats: dict, recipe: str,
) -> StageOutput:
    """Gate one space's staged vectors (count, uniqueness, shapes, norms, similarity range),
    then publish them as `embeddings/<space>` with the space's identity on every row."""
    ecfg, staged = cfg.embeddings, staging_embeddings(space)
    columns = VALUES
    audit, damaged = [], 0
    for b in staging.guarded(lake.batches(staged, shard, [*columns, "checksum"]), staged, shard):
        damaged += staging.damaged(b, columns)
        audit.append(_audit_batch(b, model.dim, ecfg.dtype))
    if damaged:
        raise StagingUnusable(f"{damaged} staged rows of shard '{shard}' in {staged} do not match the checksum taken when they were staged", staged)
    audit = pl.concat(audit) if audit else pl.DataFrame(schema={
        "uid": pl.Int64, "similarity": pl.Float32, "shape_ok": pl.Boolean, "image_norm": pl.Float64, "text_norm": pl.Float64,
    })
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
        for b in staging.guarded(lake.batches(staged, shard, columns), staged, shard)
    )
    return publish_stream(
        lake, table, shard, schema, published, audit.height, report, stats,
        {"space": space, "embedding_space": model.space, "recipe": recipe}, staged,
        fingerprints.current(lake, cfg, table, shard),
    )


def _audit_batch(b: pa.RecordBatch, dim: int, dtype: str) -> pl.DataFrame:
    """uid, similarity, whether both vectors have the model's dimension, and their norms (NaN
    where the shape is wrong)."""
    def lengths(col: pa.Array) -> np.ndarray:
        n = pc.binary_length(col) if dtype == "float16" else pc.list_value_length(col)
        return pc.fill_null(n, 0).to_numpy(zero_copy_only=False)

    want = 2 * dim if dtype == "float16" else dim
    ok = (lengths(b["image_embedding"]) == want) & (lengths(b["text_embedding"]) == want)
    norms = {}
    for col in ("image_embedding", "text_embedding"):
        norm = np.full(b.num_rows, np.nan)
        if ok.any():
            norm[ok] = np.linalg.norm(vectors.from_arrow(b[col].filter(pa.array(ok)), dim), axis=1)
        norms[col.replace("embedding", "norm")] = norm
    return pl.from_arrow(b.select(["uid", "similarity"])).with_columns(shape_ok=pl.Series(ok), **{k: pl.Series(v) for k, v in norms.items()})
