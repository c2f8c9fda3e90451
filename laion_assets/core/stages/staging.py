"""Staged chunks are disposable. A shard's staging is reused only when it was made for the
stage's current fingerprint (same inputs, config and code) and reads back intact; staging that
is stale, unreadable (a truncated or missing file) or that failed its gate is dropped with a
warning and recomputed, so a shard never gets stuck on what it staged.

Staged rows are read with pyarrow, file by file (`Lake.batches`): a broken file raises a
plain error there, which becomes StagingUnusable. What a file cannot tell (a flipped bit that
still decodes: a float16 element changed, norms still in tolerance) the rows' own checksums
do: staged images carry the sha256 of their bytes, staged vectors and scores a `checksum` of
their values (`checksums`), taken when they were staged and checked before they publish."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import polars as pl
import pyarrow as pa
from deltalake.exceptions import DeltaError

from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError, StagingUnusable, explain
from laion_assets.core.stages import fingerprints

log = logging.getLogger(__name__)


def read(lake: Lake, table: str, shard: str, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """All staged rows of a shard (a few small columns), or StagingUnusable."""
    with readable(table, shard):
        frames = [pl.from_arrow(b) for b in lake.batches(table, shard, list(schema))] if lake.exists(table) else []
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)


def usable(lake: Lake, table: str, shard: str, fingerprint: str, schema: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
    """The shard's staged rows (the columns of `schema`, by default uid) when they were all made
    for `fingerprint` and can be read; otherwise the shard's staging is dropped (with a warning
    saying why) and nothing is returned: the stage recomputes it."""
    schema = schema or {"uid": pl.Int64}
    try:
        staged = read(lake, table, shard, {**schema, "recipe": pl.String})
    except StagingUnusable as e:
        drop(lake, table, shard, str(e))
        return pl.DataFrame(schema=schema)
    stale = staged.filter(pl.col("recipe").ne_missing(fingerprint)).height
    if stale:
        drop(lake, table, shard, f"{stale} of {staged.height} rows were made from other inputs, config or code")
        return pl.DataFrame(schema=schema)
    return staged.drop("recipe")


def table_for(table: str) -> str | None:
    """The staging table of a stage's table (`images`, `embeddings/<space>`, `watermark`), or None."""
    return f"_staging/{table}" if fingerprints.stage_of(table) in ("images", "embeddings", "watermark") else None


def leftover(lake: Lake, table: str, shard: str) -> bool:
    """Whether the shard still has staging although `table`'s shard is published from exactly
    that staging (a kill between the publish and the staging's removal): garbage."""
    staged_in = table_for(table)
    if staged_in is None or not lake.exists(staged_in) or not lake.shard_files(staged_in, shard):
        return False
    rec = fingerprints.recorded(lake, table, shard)
    if rec is None or rec.files != fingerprints.files_id(lake, table, shard):
        return False
    try:
        recipes = set(read(lake, staged_in, shard, {"recipe": pl.String})["recipe"])
    except StagingUnusable:
        return True
    return recipes <= {rec.recipe}


def sweep(lake: Lake) -> list[str]:
    """Remove every shard's leftover staging (see `leftover`); returns `table/shard` names."""
    removed = []
    for staged_in in (t for t in lake.tables() if t.startswith("_staging/")):
        table = staged_in.removeprefix("_staging/")
        for shard in sorted({p["shard"] for p in lake.table(staged_in).partitions()}):
            if leftover(lake, table, shard):
                lake.drop_shard(staged_in, shard)
                removed.append(f"{staged_in}/{shard}")
    return removed


def drop(lake: Lake, table: str, shard: str, why: str) -> None:
    """Remove a shard's staging now (rows and files), saying why: it is recomputed."""
    log.warning("shard %s: staged chunks in %s dropped and recomputed: %s", shard, table, why)
    lake.drop_shard(table, shard)


@contextmanager
def readable(table: str, shard: str) -> Iterator[None]:
    """Turn a failure to read staged chunks (a truncated, missing or corrupt file, a log
    deltalake cannot parse) into StagingUnusable, which callers answer by dropping the staging.
    A disk, permission or object-store failure is not the staging's fault: it is raised as is."""
    try:
        yield
    except LaionAssetsError:
        raise
    except (OSError, ValueError, RuntimeError, pa.ArrowException, DeltaError) as e:
        infra = explain(e)
        if infra is not None and infra.kind not in ("corrupt", "missing"):
            raise infra from e
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:240]
        raise StagingUnusable(f"staged chunks of shard '{shard}' in {table} cannot be read ({detail})", table) from e


def guarded(batches: Iterable[pa.RecordBatch], table: str, shard: str) -> Iterator[pa.RecordBatch]:
    """`batches` of staged rows, read under `readable` (a write that fails stays a write error)."""
    it = iter(batches)
    while True:
        with readable(table, shard):
            batch = next(it, None)
        if batch is None:
            return
        yield batch


def checksums(table: pa.Table | pa.RecordBatch, columns: list[str]) -> pa.Array:
    """Per row, a digest of its values in `columns` (binary cells, lists of floats or scalars)."""
    cells = [_cells(table.column(c)) for c in columns]
    return pa.array([hashlib.blake2b(b"".join(row), digest_size=8).hexdigest() for row in zip(*cells)], pa.string())


def damaged(table: pa.Table | pa.RecordBatch, columns: list[str]) -> int:
    """How many rows no longer match the checksum taken when they were staged (a row staged
    without one counts as damaged: it cannot be verified)."""
    want = table.column("checksum").to_pylist()
    return sum(w != got for w, got in zip(want, checksums(table, columns).to_pylist()))


def _cells(col: pa.Array | pa.ChunkedArray) -> list[bytes]:
    if pa.types.is_binary(col.type):
        return [b or b"" for b in col.to_pylist()]
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return [np.asarray(v or [], np.float32).tobytes() for v in col.to_pylist()]
    return [v.tobytes() for v in col.to_numpy(zero_copy_only=False)]  # a null float: NaN
