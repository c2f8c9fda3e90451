"""Config of the scoring stages: LAION's heads (each on its own embedding space) and the
watermark classifier."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from laion_assets.core.lake.config import NAME, Section

# Score columns with a LAION meaning: thresholds on them need the head (or model) producing them.
LAION_SCORES = ("punsafe", "aesthetic", "aesthetic_v2", "pwatermark")


class HeadConfig(Section):
    """A scoring head file, the embedding space it was trained on, and (optionally) which
    configured space feeds it; by default the one whose model is `trained_on`."""

    path: str
    trained_on: str = Field("ViT-B-32/openai", description="embedding space, model/pretrained")
    space: str | None = Field(None, description="configured space to feed it (default: the one matching trained_on)")

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.expandvars(os.path.expanduser(v))


class ScoresConfig(Section):
    """Scoring heads by output column (e.g. aesthetic, punsafe); each runs on its own space."""

    heads: dict[str, HeadConfig] = Field(default_factory=dict, description="column name -> head")
    allow_embedding_space_mismatch: bool = Field(
        False, description="feed a head a space other than its trained_on (scores shift!)"
    )

    @field_validator("heads")
    @classmethod
    def _columns(cls, v: dict[str, HeadConfig]) -> dict[str, HeadConfig]:
        bad = [name for name in v if not re.match(NAME, name) or name in ("uid", "shard")]
        if bad:
            raise ValueError(f"head names are column names: lowercase, not uid/shard, got {bad}")
        return v


class WatermarkConfig(Section):
    """The pixel classifier giving pwatermark, run in the embeddings pass on the decoded image.
    LAION's: timm `efficientnet_b3a` with a 3-layer head, weights `watermark_model_v1.pt`."""

    model: str = Field("efficientnet_b3a", description="timm model name, or 'tiny' (random, offline demos)")
    checkpoint: str | None = Field(None, description="local state_dict path (LAION's watermark_model_v1.pt)")
    classifier: Literal["laion", "timm"] = Field("laion", description="LAION's 625-256-2 head, or the model's own 2-class head")
    image_size: int = Field(256, ge=16, description="square resize before the model (LAION: 256)")

    @field_validator("checkpoint")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return os.path.expandvars(os.path.expanduser(v)) if v else v

    @property
    def identity(self) -> str:
        """What a pwatermark is comparable with: the model and its weights (a missing file
        reads as the model alone; loading it is what refuses it)."""
        if not self.checkpoint or not Path(self.checkpoint).is_file():
            return f"{self.model}/{'random-seed0' if not self.checkpoint else 'missing-checkpoint'}"
        digest = hashlib.sha256()
        with open(self.checkpoint, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return f"{self.model}/{digest.hexdigest()[:16]}"
