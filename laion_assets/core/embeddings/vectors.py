"""Embedding columns in Delta.

Delta Lake has neither a float16 type nor fixed-size lists, so float16 vectors are stored as
binary cells of little-endian float16 (2 bytes a dimension: half of float32, and any reader
decodes them with `np.frombuffer(cell, '<f2')`); `dtype: float32` stores plain list<float>.
"""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pyarrow as pa


def arrow_type(dtype: str) -> pa.DataType:
    return pa.binary() if dtype == "float16" else pa.list_(pa.float32())


def to_column(vectors: np.ndarray, dtype: str) -> pa.Array:
    if dtype == "float16":
        v = np.ascontiguousarray(vectors, dtype="<f2")
        n, width = v.shape[0], 2 * v.shape[1]  # every cell the same size: offsets are a range
        offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
        return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(v)])
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(v.ravel(), v.shape[1]).cast(pa.list_(pa.float32()))


def widen(v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16 rows as float32 (exactly: every half float is a float32), in the first rows of
    `out` when given. numpy converts half floats one by one (~2.7 ns a value on the project's
    VM); torch's copy uses the CPU's F16C instructions, ~8x faster. A loop over chunks passes
    the same `out` each time: a fresh 200 MB array costs more in page faults than the copy."""
    if v.dtype != np.float16:
        return np.asarray(v, np.float32)
    import torch

    out = np.empty(v.shape, np.float32) if out is None else out[: len(v)]
    with warnings.catch_warnings():  # torch warns that a read-only array is shared: it is only read
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(out).copy_(torch.from_numpy(v))
    return out


def from_arrow(col: pa.Array | pa.ChunkedArray, dim: int | None = None) -> np.ndarray:
    """(n, dim) float32 from a binary-float16 or list<float> column, without per-row objects."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if len(col) == 0:
        return np.zeros((0, dim or 0), np.float32)
    if col.null_count:
        raise ValueError("embedding column has nulls")
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type) or pa.types.is_binary_view(col.type):
        col = col.cast(pa.large_binary())
        offsets = np.frombuffer(col.buffers()[1], np.int64)[col.offset : col.offset + len(col) + 1]
        flat = np.frombuffer(col.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].view("<f2")
        return widen(flat.reshape(len(col), -1))
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(col), -1)


def from_column(col: pl.Series, dim: int | None = None) -> np.ndarray:
    """(n, dim) float32 from a polars binary-float16 or list<float> column."""
    return from_arrow(col.to_arrow(), dim)
