"""embeddings/<space> of an adopted space: published vectors (LAION's parquet_npy layout) taken
as they are for a shard whose raw_urls came from the metadata file beside them, instead of
computed from images. Re-embedding LAION-5B costs thousands of GPU-hours; reading its published
vectors costs a pass over the files.

Before anything is registered, every part is checked (`check_part`): the same row count in the
npy files and the metadata, the space's dimension, no NaN, unit norm within the embeddings
gate's tolerance; each refusal is one line. The stage then audits a shard's vectors with the
embeddings gate and publishes them as a stream, `CHUNK_ROWS` at a time, so memory stays flat
in the file size. Without text embeddings, `similarity` is the metadata's own column.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack

import numpy as np
import polars as pl
import pyarrow as pa

from laion_assets.core.config import PipelineConfig
from laion_assets.core.embeddings import vectors
from laion_assets.core.embeddings.published import NpyRows, Part, metadata_rows, part_of
from laion_assets.core.ingest import registry
from laion_assets.core.lake import quality
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError, explained
from laion_assets.core.lake.tables import RAW_URLS, embeddings_table, staging_embeddings
from laion_assets.core.stages import fingerprints
from laion_assets.core.stages.publish import StageOutput, gate, publish_stream

CHUNK_ROWS = 65_536  # vectors read at a time: 96 MiB of float32 for 768-d
SIMILARITY_COLUMN = "similarity"  # LAION's metadata column: the B/32 (400M) or L/14 (5B) cosine


def adopted_space(cfg: PipelineConfig, space: str) -> tuple[str, int]:
    """(identity, dimension) of a space declared `adopted` in the config."""
    from laion_assets.core.embeddings.clip import embed_dim  # open_clip's model configs; torch with them

    spaces = cfg.embeddings.spaces
    if space not in spaces:
        raise LaionAssetsError(f"space '{space}' is not in embeddings.spaces ({', '.join(spaces)}): declare it, e.g. l14: {{model: ViT-L-14, pretrained: openai, adopted: true}}")
    if not spaces[space].adopted:
        raise LaionAssetsError(f"space '{space}' is computed from images: set embeddings.spaces.{space}.adopted: true to adopt published vectors")
    return spaces[space].identity, embed_dim(spaces[space])


def _name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def check_part(part: Part, space: str, dim: int, tolerance: float, values: bool = True) -> int:
    """Refuse, in one line, a part whose vectors cannot be this space's (row counts and widths;
    with `values`, NaN and norms too: a pass over the files); returns its rows."""
    rows = metadata_rows(part.metadata)
    with ExitStack() as stack:
        files = [stack.enter_context(NpyRows(uri)) for uri in (part.image, part.text) if uri]
        for f in files:
            if f.rows != rows:
                raise LaionAssetsError(f"{_name(f.uri)} has {f.rows} vectors but {_name(part.metadata)} has {rows} rows: they must match row for row")
            if f.dim != dim:
                raise LaionAssetsError(f"{_name(f.uri)} holds {f.dim}-d vectors but space {space} is {dim}-d: declare the space of the model that made them")
        wide = np.empty((min(rows, CHUNK_ROWS), dim), np.float32) if values and files else None
        for f in files if values else []:
            stored = f.buffer(CHUNK_ROWS)
            for start in range(0, rows, CHUNK_ROWS):
                v = vectors.widen(f.read(start, min(rows, start + CHUNK_ROWS), stored), wide)
                norms = np.sqrt(np.einsum("ij,ij->i", v, v))  # NaN or inf in a vector makes its norm so
                finite = np.isfinite(norms)
                if not finite.all():
                    raise LaionAssetsError(f"{_name(f.uri)} row {start + int(np.argmin(finite))} has NaN or infinite values: the file is corrupt")
                off = np.abs(norms - 1) > tolerance
                if off.any():
                    at = int(np.argmax(off))
                    raise LaionAssetsError(
                        f"{_name(f.uri)}: {int(off.sum())} vectors from row {start + at} on are not unit-norm (norm {norms[at]:.3f}, "
                        f"tolerance {tolerance}): adopt L2-normalised CLIP embeddings"
                    )
    return rows


def _source_part(lake: Lake, shard: str) -> Part:
    return part_of(registry.source_of(lake, shard))


def _chunks(part: Part, raw: pl.DataFrame) -> Iterator[tuple[pl.DataFrame, np.ndarray, np.ndarray | None]]:
    """(raw_urls rows, their image vectors, text vectors or None) `CHUNK_ROWS` rows at a time,
    each row's vectors at its `source_row` (raw_urls keeps out rows, so rows can be skipped).
    A chunk's vectors may be overwritten by the next chunk's: use them before asking for it."""
    with ExitStack() as stack:
        files = [stack.enter_context(NpyRows(uri)) if uri else None for uri in (part.image, part.text)]
        stored = [None if f is None else f.buffer(CHUNK_ROWS) for f in files]
        for start in range(0, raw.height, CHUNK_ROWS):
            rows = raw.slice(start, CHUNK_ROWS)
            at = rows["source_row"].to_numpy()
            lo, hi = int(at[0]), int(at[-1]) + 1
            if hi - lo == len(at):  # no row kept out in this range: read in place, no gather
                yield rows, *(None if f is None else f.read(lo, hi, b) for f, b in zip(files, stored))
            else:
                yield rows, *(None if f is None else f.read(lo, hi)[at - lo] for f in files)


@explained
def run_adopted_embeddings(lake: Lake, cfg: PipelineConfig, shard: str, space: str) -> StageOutput:
    """Audit then publish the shard's published vectors as `embeddings/<space>`, one row per
    raw_urls row, with `embedding_space` the space's identity."""
    started = time.monotonic()
    identity, dim = adopted_space(cfg, space)
    part = _source_part(lake, shard)
    check_part(part, space, dim, cfg.quality.embedding_norm_tolerance, values=False)  # the gate checks the values
    columns = ["uid", "source_row"] + ([SIMILARITY_COLUMN] if part.text is None else [])
    raw = lake.read_shard(RAW_URLS, shard).select(*(c for c in columns if c in lake.scan(RAW_URLS).collect_schema())).sort("source_row")
    if part.text is None and SIMILARITY_COLUMN not in raw.columns:
        raise LaionAssetsError(f"{_name(part.metadata)} has no text embeddings and no {SIMILARITY_COLUMN} column: there is no similarity to adopt")

    audit = []  # one frame per chunk; its similarity is published with the chunk's vectors
    buffers = [np.empty((min(raw.height, CHUNK_ROWS), dim), np.float32) for _ in range(2)]
    for rows, img, txt in _chunks(part, raw):
        x = vectors.widen(img, buffers[0])  # float16 -> float32 is the cost here: once per vector
        y = None if txt is None else vectors.widen(txt, buffers[1])
        audit.append(pl.DataFrame({
            "uid": rows["uid"], "shape_ok": np.full(rows.height, True), "image_norm": np.sqrt(np.einsum("ij,ij->i", x, x)),
            "text_norm": np.ones(rows.height) if y is None else np.sqrt(np.einsum("ij,ij->i", y, y)),
            "similarity": rows[SIMILARITY_COLUMN].cast(pl.Float32) if y is None else np.einsum("ij,ij->i", x, y),
        }))
    frames, audit = audit, pl.concat(audit) if audit else pl.DataFrame(schema={"uid": pl.Int64, "similarity": pl.Float32, "shape_ok": pl.Boolean, "image_norm": pl.Float64, "text_norm": pl.Float64})
    table = embeddings_table(space)
    stats = {
        "space": space, "embedding_space": identity, "embedding_dim": dim, "adopted_from": part.image,
        "text_embeddings": part.text or "none", "rows": raw.height,
        "similarity_from": "image and text embeddings" if part.text else f"the metadata's {SIMILARITY_COLUMN} column (no text embeddings)",
        "mean_similarity": round(float(audit["similarity"].mean() or 0), 4),
    }
    suite = quality.embeddings_suite(raw.height, cfg.quality.embedding_norm_tolerance)
    report = gate(table, shard, audit, suite, stats)
    vec = vectors.arrow_type("float16")
    schema = pa.schema([("uid", pa.int64()), ("image_embedding", vec), ("text_embedding", vec),
                        ("similarity", pa.float32()), ("embedding_space", pa.string())])
    batches = (
        pa.record_batch([
            rows["uid"].to_arrow(), vectors.to_column(img, "float16"),
            pa.nulls(rows.height, vec) if txt is None else vectors.to_column(txt, "float16"),
            checked["similarity"].cast(pl.Float32).to_arrow(), pa.array([identity] * rows.height, pa.string()),
        ], schema=schema)
        for (rows, img, txt), checked in zip(_chunks(part, raw), frames)
    )
    out = publish_stream(
        lake, table, shard, schema, batches, raw.height, report, stats,
        {"space": space, "embedding_space": identity, "adopted_from": part.image}, staging_embeddings(space),
        fingerprints.current(lake, cfg, table, shard),
    )
    out.stats["duration_s"] = round(time.monotonic() - started, 2)
    return out
