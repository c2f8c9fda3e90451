"""Pipeline configuration: one typed object per stage, validated once at the boundary.

A config file is YAML with the top-level keys below; every key is optional and unknown keys
are an error (a typo must not silently fall back to a default). README.md documents each key.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from laion_assets.core.errors import LaionAssetsError
from laion_assets.core.subset_rules import SubsetConfig

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(_Strict):
    """How raw_urls reads a shard."""

    min_usable_rate: float = Field(
        0.5, gt=0, le=1, description="raw_urls gate: share of input rows with a fetchable URL (not kept out)"
    )


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
    max_retry_after_s: float = Field(
        5.0, ge=0, description="longest Retry-After waited for; a longer one fails at once (retryable)"
    )
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


SPACE_NAME = r"^[a-z][a-z0-9_]*$"
# Offline presets: randomly initialised open_clip configs (fixed seed) of the same widths as
# ViT-B/32 (512-d) and ViT-L/14 (768-d), so LAION's head files fit them dimensionally.
TINY_PRESETS = {"tiny": "tiny_clip", "tiny-l": "tiny_clip_l"}


class SpaceConfig(_Strict):
    """One embedding space: an open_clip model and its weights (name + pretrained tag, a local
    checkpoint, or a tiny offline preset)."""

    model: str = Field("ViT-B-32", description="open_clip model name, or 'tiny' / 'tiny-l' (offline, random)")
    pretrained: str | None = Field("openai", description="open_clip pretrained tag")
    checkpoint: str | None = Field(None, description="local checkpoint path; overrides pretrained")
    batch_size: int | None = Field(None, ge=1, description="overrides embeddings.batch_size for this model")

    @property
    def identity(self) -> str:
        """What the vectors are comparable with, e.g. 'ViT-B-32/openai': recorded with every
        vector and score, and what a head's `trained_on` must match."""
        if self.model in TINY_PRESETS:
            return f"{self.model}/random-seed0"
        tag = Path(self.checkpoint).name if self.checkpoint else (self.pretrained or "random")
        return f"{self.model}/{tag}"


class EmbeddingConfig(_Strict):
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
        bad = [name for name in v if not re.match(SPACE_NAME, name)]
        if bad:
            raise ValueError(f"space names must match {SPACE_NAME} (they become asset keys), got {bad}")
        if "watermark" in v:
            raise ValueError("'watermark' is the watermark classifier's name: call the space something else")
        return v


class HeadConfig(_Strict):
    """A scoring head file, the embedding space it was trained on, and (optionally) which
    configured space feeds it; by default the one whose model is `trained_on`."""

    path: str
    trained_on: str = Field("ViT-B-32/openai", description="embedding space, model/pretrained")
    space: str | None = Field(None, description="configured space to feed it (default: the one matching trained_on)")

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.expandvars(os.path.expanduser(v))


class ScoresConfig(_Strict):
    """Scoring heads by output column (e.g. aesthetic, punsafe); each runs on its own space."""

    heads: dict[str, HeadConfig] = Field(default_factory=dict, description="column name -> head")
    allow_embedding_space_mismatch: bool = Field(
        False, description="feed a head a space other than its trained_on (scores shift!)"
    )

    @field_validator("heads")
    @classmethod
    def _columns(cls, v: dict[str, HeadConfig]) -> dict[str, HeadConfig]:
        bad = [name for name in v if not re.match(SPACE_NAME, name) or name in ("uid", "shard")]
        if bad:
            raise ValueError(f"head names are column names: lowercase, not uid/shard, got {bad}")
        return v


# Subset rules live in their own module (presets, old fields, recipes); re-exported here.
DEFAULT_SUBSETS = (SubsetConfig(preset="laion2b_en"),)

# Score columns with a LAION meaning: thresholds on them need the head (or model) producing them.
LAION_SCORES = ("punsafe", "aesthetic", "aesthetic_v2", "pwatermark")


class WatermarkConfig(_Strict):
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


class DedupConfig(_Strict):
    """Lake-wide exact and perceptual duplicates: the key index and its layout."""

    buckets: int = Field(16, ge=1, le=65536, description="key-hash buckets: the index's partitions and unit of work")
    phash_distance: int = Field(4, ge=0, le=15, description="max Hamming distance (of 64 bits) of perceptual duplicates")


class BlocklistConfig(_Strict):
    """Hash blocklists applied to the whole lake (files <name>.<kind>.txt in `location`)."""

    location: str | None = Field(None, description="folder or s3:// prefix of the list files; a sensor watches it")

    @field_validator("location")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return os.path.expandvars(os.path.expanduser(v)) if v else v


class SemanticDedupConfig(_Strict):
    """SemDeDup over one subset: k-means in an embedding space, near-duplicates inside clusters."""

    subset: str
    space: str | None = Field(None, description="embedding space (default: the subset's similarity space)")
    clusters: int = Field(1000, ge=1, description="k of k-means: memory holds one cluster at a time")
    threshold: float = Field(0.95, gt=0, le=1, description="cosine similarity above which two rows are near-duplicates")
    train_per_cluster: int = Field(256, ge=4, description="k-means training sample per cluster")
    seed: int = 0


class CurationConfig(_Strict):
    """The lake-wide layer: dedup index, blocklists, semantic dedup per subset."""

    dedup: DedupConfig = DedupConfig()
    blocklists: BlocklistConfig = BlocklistConfig()
    semantic: tuple[SemanticDedupConfig, ...] = ()


class QualityConfig(_Strict):
    """Gate thresholds beyond the fixed schema and range checks."""

    embedding_norm_tolerance: float = Field(0.01, gt=0)


class ExportConfig(_Strict):
    """Webdataset tars per subset shard (img2dataset's layout), for training."""

    samples_per_tar: int = Field(10_000, ge=1, description="samples in each tar (the last one of a shard may hold fewer)")
    subsets: tuple[str, ...] | None = Field(None, description="subsets to export (default: every subset)")


class KnnConfig(_Strict):
    """A kNN index per subset over one embedding space (faiss): exact below `exact_below`
    vectors, IVF with a compressed code above it."""

    space: str | None = Field(None, description="embedding space to index (default: the subset's similarity space)")
    subsets: tuple[str, ...] | None = Field(None, description="subsets to index (default: every subset)")
    exact_below: int = Field(100_000, ge=1, description="below this many vectors: exact (flat) search")
    codec: str = Field("SQ8", pattern=r"^(SQ8|SQ4|SQfp16|PQ\d+(x\d+)?)$", description="faiss code of the compressed index: SQ8, SQfp16, PQ<m>")
    recall_target: float = Field(0.95, gt=0, le=1, description="recall@10 the compressed index is tuned for (nprobe)")


class MaintenanceConfig(_Strict):
    vacuum_retention_hours: int = Field(168, ge=0)
    target_file_size_mb: int = Field(128, ge=1)


class UIConfig(_Strict):
    """What the Dagster UI shows of each shard. Pictures travel in the event log: a grid of 8
    thumbnails adds 30-40 KB per shard and stage, a histogram chart 4-8 KB."""

    thumbnails: int = Field(8, ge=0, le=32, description="stored images per thumbnail grid; 0: no grids")
    histograms: bool = Field(True, description="histograms of scores and image sizes with the subset thresholds")


class PipelineConfig(_Strict):
    ingest: IngestConfig = IngestConfig()
    download: DownloadConfig = DownloadConfig()
    images: ImageConfig = ImageConfig()
    embeddings: EmbeddingConfig = EmbeddingConfig()
    scores: ScoresConfig = ScoresConfig()
    watermark: WatermarkConfig | None = None
    subsets: tuple[SubsetConfig, ...] = DEFAULT_SUBSETS
    quality: QualityConfig = QualityConfig()
    maintenance: MaintenanceConfig = MaintenanceConfig()
    export: ExportConfig = ExportConfig()
    knn: KnnConfig = KnnConfig()
    ui: UIConfig = UIConfig()
    curation: CurationConfig = CurationConfig()

    @field_validator("subsets")
    @classmethod
    def _unique_names(cls, v: tuple[SubsetConfig, ...]) -> tuple[SubsetConfig, ...]:
        names = [s.name for s in v]
        if len(names) != len(set(names)):
            raise ValueError(f"subset names must be unique, got {names}")
        return v

    @model_validator(mode="after")
    def _spaces_resolve(self) -> PipelineConfig:
        for name in self.scores.heads:
            self.head_space(name)
        for sub in self.subsets:
            self.similarity_space(sub)
            self.score_columns(sub)
        names = {s.name for s in self.subsets}
        for section in ("export", "knn"):
            unknown = [n for n in getattr(self, section).subsets or () if n not in names]
            if unknown:
                raise ValueError(f"{section}.subsets names unknown subset(s) {unknown} (subsets: {', '.join(sorted(names))})")
        if self.knn.space is not None and self.knn.space not in self.embeddings.spaces:
            raise ValueError(f"knn.space '{self.knn.space}' is not in embeddings.spaces ({', '.join(self.embeddings.spaces)})")
        return self

    def score_columns(self, sub: SubsetConfig) -> set[str]:
        """The threshold columns of `sub` that our stages compute; a LAION score no configured
        head or model produces is refused (other names are source columns, checked per shard)."""
        ours = set(self.scores.heads) | ({"pwatermark"} if self.watermark else set())
        missing = sorted(c for c in sub.threshold_columns if c in LAION_SCORES and c not in ours)
        if missing:
            hint = "; ".join(
                "add a watermark section (or threshold LAION's source_pwatermark)" if c == "pwatermark"
                else f"add scores.heads.{c}" for c in missing
            )
            raise ValueError(f"subset {sub.name} thresholds {', '.join(missing)}, which nothing computes: {hint}")
        return sub.threshold_columns & ours

    def exported_subsets(self) -> list[SubsetConfig]:
        return [s for s in self.subsets if self.export.subsets is None or s.name in self.export.subsets]

    def indexed_subsets(self) -> list[SubsetConfig]:
        return [s for s in self.subsets if self.knn.subsets is None or s.name in self.knn.subsets]

    def knn_space(self, sub: SubsetConfig) -> str:
        """The space the subset's kNN index lives in: knn.space, else its similarity space."""
        return self.knn.space or self.similarity_space(sub)

    @model_validator(mode="after")
    def _semantic_resolves(self) -> PipelineConfig:
        names = [s.name for s in self.subsets]
        for sem in self.curation.semantic:
            if sem.subset not in names:
                raise ValueError(f"curation.semantic: subset '{sem.subset}' is not declared in subsets ({', '.join(names)})")
            self.semantic_space(sem)
        if len({sem.subset for sem in self.curation.semantic}) != len(self.curation.semantic):
            raise ValueError("curation.semantic: one entry per subset")
        return self

    def semantic_space(self, sem: SemanticDedupConfig) -> str:
        """The space SemDeDup clusters in: the one named, else the subset's similarity space."""
        if sem.space is not None:
            if sem.space not in self.embeddings.spaces:
                raise ValueError(f"curation.semantic: space '{sem.space}' is not in embeddings.spaces ({', '.join(self.embeddings.spaces)})")
            return sem.space
        return self.similarity_space(next(s for s in self.subsets if s.name == sem.subset))

    def head_space(self, head: str) -> str:
        """The configured space that feeds `head`: the one it names, else the one whose model
        it was trained on (else the only space, when mismatches are allowed)."""
        cfg, spaces = self.scores.heads[head], self.embeddings.spaces
        if cfg.space is not None:
            if cfg.space not in spaces:
                raise ValueError(f"scores.heads.{head}.space '{cfg.space}' is not a space in embeddings.spaces ({', '.join(spaces)})")
            return cfg.space
        matching = [name for name, sp in spaces.items() if sp.identity == cfg.trained_on]
        if matching:
            return matching[0]
        if len(spaces) == 1 and self.scores.allow_embedding_space_mismatch:
            return next(iter(spaces))
        raise ValueError(
            f"scores.heads.{head} was trained on {cfg.trained_on} but no space in embeddings.spaces "
            f"is that model ({', '.join(f'{n}: {sp.identity}' for n, sp in spaces.items())}): add it, "
            "or name one with scores.heads.<head>.space"
        )

    def similarity_space(self, sub: SubsetConfig) -> str:
        """The space whose image-text similarity `sub` filters on (and shows): the one it names,
        else the one whose model its threshold was published for; a similarity threshold with
        several spaces must find one of these; else the first space."""
        spaces = self.embeddings.spaces
        if sub.similarity_space is not None:
            if sub.similarity_space not in spaces:
                raise ValueError(f"subset {sub.name}: similarity_space '{sub.similarity_space}' is not in embeddings.spaces ({', '.join(spaces)})")
            return sub.similarity_space
        if sub.similarity_model is not None and sub.min_similarity is not None:
            matching = [name for name, sp in spaces.items() if sp.identity == sub.similarity_model]
            if not matching and len(spaces) == 1:
                return next(iter(spaces))  # the only space; the subset's stats warn of the mismatch
            if not matching:
                raise ValueError(
                    f"subset {sub.name}: its similarity threshold was published for {sub.similarity_model}, which no "
                    f"space is ({', '.join(f'{n}: {sp.identity}' for n, sp in spaces.items())}): add that model to "
                    "embeddings.spaces, or name a space with similarity_space"
                )
            return matching[0]
        if len(spaces) > 1 and sub.min_similarity is not None:
            raise ValueError(f"subset {sub.name}: set similarity_space, one of {', '.join(spaces)}")
        return next(iter(spaces))


# Keys of earlier versions, and where they went.
MOVED = {
    **{f"embeddings.{k}": f"moved: embeddings.spaces.<name>.{k}" for k in ("model", "pretrained", "checkpoint")},
    "scores.aesthetic": "moved: scores.heads.aesthetic",
    "scores.nsfw": "moved: scores.heads.punsafe",
}


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
                hint = MOVED.get(where)
                problems.append(f"unknown key '{where}'" + (f" ({hint})" if hint else ""))
            elif not where:
                problems.append(err["msg"].removeprefix("Value error, "))
            else:
                problems.append(f"'{where}': {err['msg']}")
        raise LaionAssetsError(
            f"config file {p}: " + "; ".join(problems) + " (see README.md, Configuration)"
        ) from None
