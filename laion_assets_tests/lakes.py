"""Small lakes written directly (no download, no model): the per-shard tables the curation
passes and the subset stage read, built from a few rows each, in real Delta tables."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

from laion_assets.core.config import PipelineConfig
from laion_assets.core.embeddings import vectors
from laion_assets.core.embeddings.config import EmbeddingConfig, SpaceConfig
from laion_assets.core.lake.delta import Lake
from laion_assets.core.stages import IMAGES, RAW_URLS, SCORES, embeddings_table, run_subset
from laion_assets.core.subsets.rules import SubsetConfig

SPACE = "tiny"


def sha(text: str, algo: str = "sha256") -> str:
    return hashlib.new(algo, text.encode()).hexdigest()


def row(uid: int, url: str, image: str | None = None, phash: str | None = None, status: str = "success", vector=None) -> dict:
    """A sample whose image bytes are stood in for by the string `image` (digests of it; its
    pHash, unless given, is random-like per image)."""
    image = image or url
    return {
        "uid": uid, "url": url, "status": status, "phash": (phash or sha(image, "md5")[:16]) if status == "success" else None,
        "sha256": sha(image) if status == "success" else None, "md5": sha(image, "md5") if status == "success" else None,
        "sha1": sha(image, "sha1") if status == "success" else None, "vector": vector,
    }


def publish_images(lake: Lake, shard: str, rows: list[dict]) -> None:
    df = pl.DataFrame(
        [{k: r[k] for k in ("uid", "url", "status", "sha256", "md5", "sha1", "phash")} for r in rows],
        schema={"uid": pl.Int64, "url": pl.String, "status": pl.String, "sha256": pl.String, "md5": pl.String, "sha1": pl.String, "phash": pl.String},
    ).with_columns(
        original_width=pl.lit(64, pl.Int32), original_height=pl.lit(64, pl.Int32), width=pl.lit(64, pl.Int32), height=pl.lit(64, pl.Int32),
        bytes_downloaded=pl.lit(9000, pl.Int64),
        image=pl.Series([r["sha256"].encode() if r["sha256"] else None for r in rows], dtype=pl.Binary),  # stands for the stored bytes
    )
    lake.publish_shard(IMAGES, shard, df)


def publish_shard(lake: Lake, shard: str, rows: list[dict], dim: int = 8) -> None:
    """raw_urls, images, embeddings/tiny and scores of one shard."""
    raw = pl.DataFrame({"uid": [r["uid"] for r in rows], "url": [r["url"] for r in rows], "caption": [f"caption {r['uid']}" for r in rows]})
    lake.publish_shard(RAW_URLS, shard, raw)
    publish_images(lake, shard, rows)
    ok = [r for r in rows if r["status"] == "success"]
    rng = np.random.default_rng(abs(hash(shard)) % 2**32)
    vecs = np.stack([np.asarray(r["vector"], np.float32) if r["vector"] is not None else rng.normal(size=dim).astype(np.float32) for r in ok]) if ok else np.zeros((0, dim), np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-12)
    emb = pl.DataFrame({
        "uid": pl.Series([r["uid"] for r in ok], dtype=pl.Int64),
        "image_embedding": pl.Series(vectors.to_column(vecs, "float16").to_pylist(), dtype=pl.Binary),
        "text_embedding": pl.Series(vectors.to_column(vecs, "float16").to_pylist(), dtype=pl.Binary),
        "similarity": pl.Series([0.3] * len(ok), dtype=pl.Float32),
        "embedding_space": pl.Series(["tiny/random-seed0"] * len(ok), dtype=pl.String),
    })
    lake.publish_shard(embeddings_table(SPACE), shard, emb)
    lake.publish_shard(SCORES, shard, pl.DataFrame({"uid": pl.Series([r["uid"] for r in ok], dtype=pl.Int64)}))


def config(*subsets: SubsetConfig, **curation) -> PipelineConfig:
    subsets = subsets or (SubsetConfig(name="everything"), SubsetConfig(name="unique", exclude_duplicates=("url", "sha256", "phash")))
    return PipelineConfig(
        embeddings=EmbeddingConfig(spaces={SPACE: SpaceConfig(model="tiny")}), subsets=subsets,
        **({"curation": curation["curation"]} if "curation" in curation else {}),
    )


def publish_subsets(lake: Lake, cfg: PipelineConfig, shards: list[str]) -> None:
    for sub in cfg.subsets:
        for shard in shards:
            run_subset(lake, cfg, sub, shard)


def uids(lake: Lake, table: str, version: int | None = None) -> set[tuple[str, int]]:
    df = pl.read_delta(lake.table_uri(table), version=version)
    return set(zip(df["shard"].to_list(), df["uid"].to_list()))
