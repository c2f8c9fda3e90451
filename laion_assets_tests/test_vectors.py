"""float16 vectors as float32: exact, whatever the layout they arrive in."""

import numpy as np
import pyarrow as pa

from laion_assets.core.embeddings import vectors


def _halves() -> np.ndarray:
    """Every float16 bit pattern once (NaNs, infinities, -0, subnormals included)."""
    return np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(-1, 64)


def test_widen_is_exact_for_every_half_float():
    v = _halves()
    got, want = vectors.widen(v), v.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)  # the CPU quiets signalling NaNs: still NaN
    assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])  # -0 and subnormals too


def test_widen_reads_strided_and_read_only_rows_into_a_reused_buffer():
    v = _halves()
    v.flags.writeable = False
    out = np.full((len(v), 64), 7.0, np.float32)
    got = vectors.widen(v[::2], out)
    assert np.shares_memory(got, out) and got.shape == (len(v) // 2, 64)
    assert np.array_equal(got, v[::2].astype(np.float32), equal_nan=True)


def test_binary_cells_round_trip():
    v = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float16)
    col = vectors.to_column(v, "float16")
    assert col.type == pa.binary()
    assert np.array_equal(vectors.from_arrow(col), v.astype(np.float32))
