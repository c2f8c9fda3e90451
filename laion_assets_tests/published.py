"""A folder in LAION's published-embeddings layout (`parquet_npy`, as clip-retrieval's inference
writes it and embedding-reader reads it): metadata/metadata_NNNN.parquet with LAION's columns,
img_emb/img_emb_NNNN.npy and optionally text_emb/text_emb_NNNN.npy, float16, unit-norm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)


def metadata(n: int, start: int, base_url: str, rng: np.random.Generator) -> pl.DataFrame:
    """LAION-5B's metadata columns (URL, TEXT, WIDTH, HEIGHT, similarity, punsafe, pwatermark...)."""
    return pl.DataFrame({
        "image_path": [f"{start + i:09d}" for i in range(n)],
        "URL": [f"{base_url}/img/{start + i}.jpg" for i in range(n)],
        "TEXT": [f"a photo number {start + i}" for i in range(n)],
        "WIDTH": rng.integers(200, 1200, n), "HEIGHT": rng.integers(200, 1200, n),
        "similarity": rng.uniform(0.2, 0.4, n), "punsafe": rng.uniform(0, 1, n), "pwatermark": rng.uniform(0, 1, n),
        "LICENSE": ["?"] * n, "NSFW": ["UNLIKELY"] * n,
    })


def write_parquet_npy(
    root: Path, sizes: list[int], dim: int = 768, text: bool = True, base_url: str = "http://127.0.0.1:9/laion",
    seed: int = 0, image_vectors: list[np.ndarray] | None = None,
) -> dict[str, list]:
    """Write one part per entry of `sizes`; returns what was written (frames and vectors) per part.
    `image_vectors` replaces the random image vectors of each part (e.g. to plant aesthetic ones)."""
    rng = np.random.default_rng(seed)
    for sub in ("metadata", "img_emb", *(["text_emb"] if text else [])):
        (root / sub).mkdir(parents=True, exist_ok=True)
    written: dict[str, list] = {"metadata": [], "img": [], "text": []}
    start = 0
    for k, n in enumerate(sizes):
        meta = metadata(n, start, base_url, rng)
        img = unit(rng, n, dim) if image_vectors is None else image_vectors[k].astype(np.float16)
        meta.write_parquet(root / "metadata" / f"metadata_{k:04d}.parquet")
        np.save(root / "img_emb" / f"img_emb_{k:04d}.npy", img)
        written["metadata"].append(meta)
        written["img"].append(img)
        if text:
            txt = unit(rng, n, dim)
            np.save(root / "text_emb" / f"text_emb_{k:04d}.npy", txt)
            written["text"].append(txt)
        start += n
    return written
