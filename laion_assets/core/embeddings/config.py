"""Config of the embeddings stage: the lake's embedding spaces and how they are computed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from laion_assets.core.lake.config import NAME, Section

# Offline presets: randomly initialised open_clip configs (fixed seed) of the same widths as
# ViT-B/32 (512-d) and ViT-L/14 (768-d), so LAION's head files fit them dimensionally.
TINY_PRESETS = {"tiny": "tiny_clip", "tiny-l": "tiny_clip_l"}


class SpaceConfig(Section):
    """One embedding space: an open_clip model and its weights (name + pretrained tag, a local
    checkpoint, or a tiny offline preset)."""

    model: str = Field("ViT-B-32", description="open_clip model name, or 'tiny' / 'tiny-l' (offline, random)")
    pretrained: str | None = Field("openai", description="open_clip pretrained tag")
    checkpoint: str | None = Field(None, description="local checkpoint path, loaded instead of downloading pretrained (named with it, the space is that tag's)")
    batch_size: int | None = Field(None, ge=1, description="overrides embeddings.batch_size for this model")
    adopted: bool = Field(
        False, description="vectors are published ones read by `laion-assets adopt-embeddings` (e.g. LAION's L/14), not computed from images"
    )

    @property
    def identity(self) -> str:
        """What the vectors are comparable with, e.g. 'ViT-B-32/openai': recorded with every
        vector and score, and what a head's `trained_on` must match."""
        if self.model in TINY_PRESETS:
            return f"{self.model}/random-seed0"
        if self.checkpoint and "pretrained" not in self.model_fields_set:
            return f"{self.model}/{Path(self.checkpoint).name}"
        # a checkpoint with its tag named (a local copy of open_clip's weights, e.g. ViT-H-14
        # laion2b_s32b_b79k) is that tag's space: heads trained on it accept it
        return f"{self.model}/{self.pretrained or 'random'}"


class EmbeddingConfig(Section):
    """The embedding spaces of the lake (one `embeddings/<name>` table each) and how they are
    computed. Every space of a shard is computed in one pass that decodes each image once."""

    spaces: dict[str, SpaceConfig] = Field(
        default_factory=lambda: {"b32": SpaceConfig()},
        description="name -> model; names become asset keys embeddings/<name>",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = Field(64, ge=1)
    workers: int | None = Field(None, ge=1, description="decode/preprocess threads")
    dtype: Literal["float16", "float32"] = "float16"
    compile: bool = Field(False, description="torch.compile the image towers (slow start; measure first)")
    gpu_decode: bool = Field(False, description="nvJPEG decode + GPU resize (close to, not equal to, PIL)")
    chunk_rows: int = Field(1024, ge=1, description="rows per staged chunk (resume granularity)")

    @field_validator("spaces")
    @classmethod
    def _named(cls, v: dict[str, SpaceConfig]) -> dict[str, SpaceConfig]:
        if not v:
            raise ValueError("declare at least one embedding space")
        bad = [name for name in v if not re.match(NAME, name)]
        if bad:
            raise ValueError(f"space names must match {NAME} (they become asset keys), got {bad}")
        if "watermark" in v:
            raise ValueError("'watermark' is the watermark classifier's name: call the space something else")
        return v
