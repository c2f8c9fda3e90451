"""Config of what the Dagster UI shows of each shard."""

from __future__ import annotations

from pydantic import Field

from laion_assets.core.lake.config import Section


class UIConfig(Section):
    """What the Dagster UI shows of each shard. Pictures travel in the event log: a grid of 8
    thumbnails adds 30-40 KB per shard and stage, a histogram chart 4-8 KB."""

    thumbnails: int = Field(8, ge=0, le=32, description="stored images per thumbnail grid; 0: no grids")
    histograms: bool = Field(True, description="histograms of scores and image sizes with the subset thresholds")
