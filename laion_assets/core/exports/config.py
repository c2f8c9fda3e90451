"""Config of the exports: webdataset tars and kNN indexes per subset."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from laion_assets.core.lake.config import Section


class ExportConfig(Section):
    """Webdataset tars of each subset, for training: img2dataset's output layout (one folder, tars
    numbered across shards, per-tar parquet and stats, sizes.json), or one folder per shard."""

    layout: Literal["img2dataset", "shards"] = Field(
        "img2dataset", description="img2dataset: one folder, one brace pattern over every tar; shards: a folder per shard, keyed by uid"
    )
    samples_per_tar: int = Field(10_000, ge=1, description="samples in each tar (the last one of a shard may hold fewer)")
    subsets: tuple[str, ...] | None = Field(None, description="subsets to export (default: every subset)")


class KnnConfig(Section):
    """A kNN index per subset over one embedding space (faiss): exact below `exact_below`
    vectors, IVF with a compressed code above it."""

    space: str | None = Field(None, description="embedding space to index (default: the subset's similarity space)")
    subsets: tuple[str, ...] | None = Field(None, description="subsets to index (default: every subset)")
    exact_below: int = Field(100_000, ge=1, description="below this many vectors: exact (flat) search")
    codec: str = Field("SQ8", pattern=r"^(SQ8|SQ4|SQfp16|PQ\d+(x\d+)?)$", description="faiss code of the compressed index: SQ8, SQfp16, PQ<m>")
    recall_target: float = Field(0.95, gt=0, le=1, description="recall@10 the compressed index is tuned for (nprobe)")
