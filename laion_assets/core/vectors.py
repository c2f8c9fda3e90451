"""Embedding columns in Delta.

Delta Lake has neither a float16 type nor fixed-size lists, so float16 vectors are stored as
binary cells of little-endian float16 (2 bytes a dimension: half of float32, and any reader
decodes them with `np.frombuffer(cell, '<f2')`); `dtype: float32` stores plain list<float>.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa


def to_column(vectors: np.ndarray, dtype: str) -> pa.Array:
    if dtype == "float16":
        v = np.ascontiguousarray(vectors, dtype="<f2")
        return pa.array([row.tobytes() for row in v], pa.binary())
    return pa.array(list(np.asarray(vectors, np.float32)), pa.list_(pa.float32()))


def from_column(col: pl.Series, dim: int | None = None) -> np.ndarray:
    """(n, dim) float32 from a binary-float16 or list<float> column."""
    if col.len() == 0:
        return np.zeros((0, dim or 0), np.float32)
    if col.dtype == pl.Binary:
        flat = np.frombuffer(b"".join(col.to_list()), dtype="<f2")
        return flat.reshape(col.len(), -1).astype(np.float32)
    return np.asarray(col.to_list(), dtype=np.float32)
