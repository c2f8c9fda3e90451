"""The stages as plain functions, one module each: compute a shard, audit it, publish it
(write-audit-publish, in `publish`). Each returns a StageOutput with the numbers the UI
shows. The Dagster layer (`laion_assets.defs`) wraps these."""

from laion_assets.core.lake.tables import (
    IMAGES,
    LANGUAGE,
    RAW_URLS,
    SCORES,
    STAGING_IMAGES,
    WATERMARK,
    embeddings_table,
    staging_embeddings,
    subset_table,
)
from laion_assets.core.stages.embeddings import run_embeddings
from laion_assets.core.stages.images import run_images
from laion_assets.core.stages.language import run_language
from laion_assets.core.stages.publish import StageOutput
from laion_assets.core.stages.raw_urls import run_raw_urls
from laion_assets.core.stages.scores import run_scores
from laion_assets.core.stages.subsets import run_subset

__all__ = [
    "IMAGES", "LANGUAGE", "RAW_URLS", "WATERMARK", "SCORES", "STAGING_IMAGES", "StageOutput", "embeddings_table", "run_embeddings",
    "run_images", "run_language", "run_raw_urls", "run_scores", "run_subset", "staging_embeddings", "subset_table",
]
