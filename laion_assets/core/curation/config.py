"""Config of the lake-wide curation layer."""

from __future__ import annotations

import os

from pydantic import Field, field_validator

from laion_assets.core.lake.config import Section


class DedupConfig(Section):
    """Lake-wide exact and perceptual duplicates: the key index and its layout."""

    buckets: int = Field(16, ge=1, le=65536, description="key-hash buckets: the index's partitions and unit of work")
    phash_distance: int = Field(4, ge=0, le=15, description="max Hamming distance (of 64 bits) of perceptual duplicates")


class BlocklistConfig(Section):
    """Hash blocklists applied to the whole lake (files <name>.<kind>.txt in `location`)."""

    location: str | None = Field(None, description="folder or s3:// prefix of the list files; a sensor watches it")

    @field_validator("location")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return os.path.expandvars(os.path.expanduser(v)) if v else v


class SemanticDedupConfig(Section):
    """SemDeDup over one subset: k-means in an embedding space, near-duplicates inside clusters."""

    subset: str
    space: str | None = Field(None, description="embedding space (default: the subset's similarity space)")
    clusters: int = Field(1000, ge=1, description="k of k-means: memory holds one cluster at a time")
    threshold: float = Field(0.95, gt=0, le=1, description="cosine similarity above which two rows are near-duplicates")
    train_per_cluster: int = Field(256, ge=4, description="k-means training sample per cluster")
    seed: int = 0


class CurationConfig(Section):
    """The lake-wide layer: dedup index, blocklists, semantic dedup per subset."""

    dedup: DedupConfig = DedupConfig()
    blocklists: BlocklistConfig = BlocklistConfig()
    semantic: tuple[SemanticDedupConfig, ...] = ()
