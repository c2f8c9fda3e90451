"""Config of the raw_urls stage."""

from __future__ import annotations

from pydantic import Field

from laion_assets.core.lake.config import Section


class IngestConfig(Section):
    """How raw_urls reads a shard."""

    min_usable_rate: float = Field(
        0.5, gt=0, le=1, description="raw_urls gate: share of input rows with a fetchable URL (not kept out)"
    )
