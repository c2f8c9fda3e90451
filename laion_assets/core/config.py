"""Pipeline configuration: one typed object per stage, validated once at the boundary.

A config file is YAML with the top-level keys below; every key is optional and unknown keys
are an error (a typo must not silently fall back to a default). README.md documents each key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from laion_assets.core.errors import LaionAssetsError

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DownloadConfig(_Strict):
    """How the images stage fetches URLs."""

    concurrency: int | None = Field(None, ge=1, description="total requests in flight; default 32 per core")
    per_host: int = Field(16, ge=1, description="requests in flight per host")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0, description="max wait between two reads")
    total_timeout_s: float = Field(30.0, gt=0, description="whole request incl. body")
    retries: int = Field(1, ge=0, description="extra tries for timeouts, resets, 429 and 5xx")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay, doubled each try")
    max_redirects: int = Field(5, ge=0)
    max_body_bytes: int = Field(32 * 2**20, ge=1024)
    user_agent_token: str | None = Field(None, description="your token in the User-Agent")
    user_agent_url: str = "https://github.com/laion-ai/laion_assets"
    opt_out_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    allowed_networks: tuple[str, ...] = Field(
        (), description="CIDRs exempt from the SSRF guard, e.g. 127.0.0.1/32 for a local server"
    )
    dns_cache_ttl_s: int = Field(300, ge=0)
    min_success_rate: float = Field(0.5, ge=0, le=1, description="quality gate on each shard")
    chunk_rows: int = Field(256, ge=1, description="rows per staged chunk (resume granularity)")
    max_pending_mb: int = Field(256, ge=1, description="downloaded bodies waiting for decode, MiB")
    url_blocklist: str | None = Field(None, description="file of URLs or sha256(url) hex, one a line")
    image_blocklist: str | None = Field(None, description="file of sha256 hex of image bytes")


class ImageConfig(_Strict):
    """How downloaded images are checked, resized and re-encoded."""

    size: int = Field(256, ge=8)
    resize_mode: ResizeMode = "keep_ratio"
    downscale_filter: Literal["area", "bicubic", "lanczos"] = Field(
        "area", description="filter to shrink (area = img2dataset's INTER_AREA); enlarging uses lanczos"
    )
    format: Literal["jpg", "webp", "png"] = "jpg"
    quality: int = Field(95, ge=1, le=100)
    skip_reencode: bool = Field(False, description="store original bytes when already small enough")
    min_image_size: int = Field(0, ge=0, description="smallest side, pixels")
    max_aspect_ratio: float | None = Field(None, ge=1)
    max_image_area: int | None = Field(None, ge=1, description="filter: max width*height")
    max_decode_pixels: int = Field(
        89_478_485, ge=1, description="decompression-bomb guard, pixels (Pillow's default)"
    )


class EmbeddingConfig(_Strict):
    """Which open_clip model embeds images and captions, and how."""

    model: str = Field("ViT-B-32", description="open_clip model name, or 'tiny' (offline, random)")
    pretrained: str | None = Field("openai", description="open_clip pretrained tag")
    checkpoint: str | None = Field(None, description="local checkpoint path; overrides pretrained")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = Field(64, ge=1)
    workers: int | None = Field(None, ge=1, description="decode/preprocess threads")
    dtype: Literal["float16", "float32"] = "float16"
    compile: bool = Field(False, description="torch.compile the image tower (slow start; measure first)")
    gpu_decode: bool = Field(False, description="nvJPEG decode + GPU resize (close to, not equal to, PIL)")
    chunk_rows: int = Field(1024, ge=1, description="rows per staged chunk (resume granularity)")

    @property
    def space(self) -> str:
        """The embedding space scores are tied to, e.g. 'ViT-B-32/openai'."""
        if self.model == "tiny":
            return "tiny/random-seed0"
        tag = Path(self.checkpoint).name if self.checkpoint else (self.pretrained or "random")
        return f"{self.model}/{tag}"


class HeadConfig(_Strict):
    """A scoring head file and the embedding space it was trained on."""

    path: str
    trained_on: str = Field("ViT-B-32/openai", description="embedding space, model/pretrained")

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.expandvars(os.path.expanduser(v))


class ScoresConfig(_Strict):
    aesthetic: HeadConfig | None = None
    nsfw: HeadConfig | None = None
    allow_embedding_space_mismatch: bool = Field(
        False, description="apply heads to another model's embeddings (scores shift!)"
    )


class SubsetConfig(_Strict):
    """A named filter over scores; `None` thresholds are not applied."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    min_similarity: float | None = Field(None, ge=-1, le=1)
    max_punsafe: float | None = Field(None, ge=0, le=1, description="kept when punsafe < this or unscored")
    min_aesthetic: float | None = None
    max_pwatermark: float | None = Field(None, ge=0, le=1, description="on the source pwatermark column")
    min_width: int | None = Field(None, ge=0)
    min_height: int | None = Field(None, ge=0)

    def recipe(self, space: str, code_version: str) -> dict:
        """What made this subset: thresholds, embedding space, code version."""
        body = self.model_dump(exclude={"description"})
        body.update(embedding_space=space, code_version=code_version)
        body["recipe_id"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        return body


DEFAULT_SUBSETS = (
    SubsetConfig(
        name="laion5b",
        description="LAION-5B rule: CLIP similarity >= 0.28 (ViT-B/32), punsafe < 0.5 where scored",
        min_similarity=0.28,
        max_punsafe=0.5,
    ),
    SubsetConfig(
        name="aesthetics_6plus",
        description="LAION-Aesthetics V2 style: aesthetic score >= 6",
        min_aesthetic=6.0,
    ),
)


class QualityConfig(_Strict):
    """Gate thresholds beyond the fixed schema and range checks."""

    embedding_norm_tolerance: float = Field(0.01, gt=0)


class MaintenanceConfig(_Strict):
    vacuum_retention_hours: int = Field(168, ge=0)
    target_file_size_mb: int = Field(128, ge=1)


class PipelineConfig(_Strict):
    download: DownloadConfig = DownloadConfig()
    images: ImageConfig = ImageConfig()
    embeddings: EmbeddingConfig = EmbeddingConfig()
    scores: ScoresConfig = ScoresConfig()
    subsets: tuple[SubsetConfig, ...] = DEFAULT_SUBSETS
    quality: QualityConfig = QualityConfig()
    maintenance: MaintenanceConfig = MaintenanceConfig()

    @field_validator("subsets")
    @classmethod
    def _unique_names(cls, v: tuple[SubsetConfig, ...]) -> tuple[SubsetConfig, ...]:
        names = [s.name for s in v]
        if len(names) != len(set(names)):
            raise ValueError(f"subset names must be unique, got {names}")
        return v


def load_config(path: str | os.PathLike | None) -> PipelineConfig:
    """Read a YAML config file; `None` gives the defaults."""
    if path is None:
        return PipelineConfig()
    p = Path(path)
    if not p.is_file():
        raise LaionAssetsError(f"config file {p} not found: pass an existing YAML file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LaionAssetsError(f"config file {p} is not valid YAML: {e}".replace("\n", " ")) from e
    if not isinstance(raw, dict):
        raise LaionAssetsError(f"config file {p} must be a mapping of sections, got {type(raw).__name__}")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{where}'")
            else:
                problems.append(f"'{where}': {err['msg']}")
        raise LaionAssetsError(
            f"config file {p}: " + "; ".join(problems) + " (see README.md, Configuration)"
        ) from None
