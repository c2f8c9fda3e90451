"""A small lake built without downloading or embedding: real JPEG/PNG bytes in `images`, chosen
unit vectors in `embeddings/<space>` (so a test can plant a neighbour), and the subset made by
the real subsets stage over them."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from laion_assets.core.config import PipelineConfig
from laion_assets.core.embeddings import vectors
from laion_assets.core.lake.delta import Lake
from laion_assets.core.stages import IMAGES, RAW_URLS, SCORES, embeddings_table, run_language, run_subset
from laion_assets_tests.conftest import make_config


def image_bytes(i: int, fmt: str = "JPEG", size=(40, 30)) -> bytes:
    rng = np.random.default_rng(i)
    px = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, fmt)
    return buf.getvalue()


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def publish_shard(lake: Lake, cfg: PipelineConfig, shard: str, n: int, seed: int, dim: int,
                  planted: dict[int, np.ndarray] | None = None, space: str = "tiny") -> pl.DataFrame:
    """`n` samples in `shard` (row i's vector replaced by planted[i]); the last row failed to
    download (so it is in no subset); row 1 is stored as PNG. The caption language and every
    subset are made by the real stages. Returns the raw rows."""
    rng = np.random.default_rng(seed)
    uids = rng.integers(-(2**62), 2**62, n, dtype=np.int64)
    raw = pl.DataFrame({
        "uid": uids,
        "url": [f"http://127.0.0.1:1/{shard}/{i}.jpg" for i in range(n)],
        "caption": [f"{shard} caption {i}" if i % 7 else None for i in range(n)],
        "LICENSE": ["cc-by" if i % 2 else "?" for i in range(n)],
        "LANGUAGE": ["en" if i % 3 else "de" for i in range(n)],
        "similarity": rng.random(n),
    })
    blobs = [image_bytes(seed * 10_000 + i, "PNG" if i == 1 else "JPEG") for i in range(n)]
    ok = [i < n - 1 for i in range(n)]
    images = pl.DataFrame({
        "uid": uids,
        "status": ["success" if good else "failed_download" for good in ok],
        "original_width": [40] * n, "original_height": [30] * n, "width": [40] * n, "height": [30] * n,
        "sha256": [f"{i:064x}" for i in range(n)],
        "bytes_downloaded": [len(b) for b in blobs],
        "image": [b if good else None for b, good in zip(blobs, ok)],
    })
    vecs = unit(rng, n, dim)
    for i, v in (planted or {}).items():
        vecs[i] = v
    good = np.array(ok)
    emb = pl.DataFrame({
        "uid": uids[good],
        "image_embedding": pl.from_arrow(vectors.to_column(vecs[good], "float16")),
        "text_embedding": pl.from_arrow(vectors.to_column(unit(rng, int(good.sum()), dim), "float16")),
        "similarity": rng.random(int(good.sum())) * 0.5,
        "embedding_space": ["tiny/random-seed0"] * int(good.sum()),
    })
    scores = pl.DataFrame({
        "uid": uids[good], "aesthetic": (rng.random(int(good.sum())) * 10).astype(np.float32),
        "punsafe": (rng.random(int(good.sum())) * 0.5).astype(np.float32),
    })
    lake.publish_shard(RAW_URLS, shard, raw)
    lake.publish_shard(IMAGES, shard, images)
    lake.publish_shard(embeddings_table(space), shard, emb)
    lake.publish_shard(SCORES, shard, scores)
    run_language(lake, cfg, shard)
    for sub in cfg.subsets:
        run_subset(lake, cfg, sub, shard)
    return raw


TEXT_QUERY = "a red car"


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """A template lake of two shards (s0: 120 rows, s1: 80) over the tiny space, with planted
    vectors: s0 row 5 is the tiny model's embedding of TEXT_QUERY, s1 row 8 the embedding of
    its own image, s0 row 9 a random unit vector (`vector`). Copy it before changing it."""
    from laion_assets.core.embeddings.config import SpaceConfig
    from laion_assets.core.exports.search import QueryEncoder

    root = tmp_path_factory.mktemp("planted")
    cfg = make_config(knn={"exact_below": 100})
    encoder = QueryEncoder(SpaceConfig(model="tiny"), "cpu")
    image_row = 8
    image = image_bytes(2 * 10_000 + image_row)
    vector = unit(np.random.default_rng(99), 1, 512)[0]
    lake = Lake(root / "lake")
    raw0 = publish_shard(lake, cfg, "s0", 120, 1, 512, planted={5: encoder(text=TEXT_QUERY), 9: vector})
    raw1 = publish_shard(lake, cfg, "s1", 80, 2, 512, planted={image_row: encoder(image=image)})
    return {
        "lake": root / "lake", "config": cfg, "vector": vector, "image": image,
        "text_uid": raw0["uid"][5], "text_caption": raw0["caption"][5], "vector_uid": raw0["uid"][9],
        "image_uid": raw1["uid"][image_row], "image_caption": raw1["caption"][image_row],
    }


def copy_lake(planted: dict, dest: Path) -> Lake:
    shutil.copytree(planted["lake"], dest)
    return Lake(dest)
