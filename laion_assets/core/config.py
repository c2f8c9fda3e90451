"""Pipeline configuration: one typed object per stage, validated once at the boundary.

A config file is YAML with the top-level keys below; every key is optional and unknown keys
are an error (a typo must not silently fall back to a default). docs/CONFIGURATION.md documents each key.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError, field_validator, model_validator

from laion_assets.core.curation.config import CurationConfig, SemanticDedupConfig
from laion_assets.core.embeddings.config import EmbeddingConfig
from laion_assets.core.exports.config import ExportConfig, KnnConfig
from laion_assets.core.images.config import DownloadConfig, ImageConfig
from laion_assets.core.ingest.config import IngestConfig
from laion_assets.core.lake.config import MaintenanceConfig, QualityConfig, Section
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.scores.config import LAION_SCORES, ScoresConfig, WatermarkConfig
from laion_assets.core.subsets.rules import SubsetConfig
from laion_assets.core.ui.config import UIConfig

DEFAULT_SUBSETS = (SubsetConfig(preset="laion2b_en"),)


class PipelineConfig(Section):
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

    @model_validator(mode="after")
    def _fetch_filter_resolves(self) -> PipelineConfig:
        """A subset that filters before the download may read only what exists without images."""
        name = self.download.only_subset
        if name is None:
            return self
        sub = self.fetch_filter()
        if sub is None:
            raise ValueError(f"download.only_subset '{name}' is not declared in subsets ({', '.join(s.name for s in self.subsets)})")
        space = self.similarity_space(sub)
        if sub.min_similarity is not None and not self.embeddings.spaces[space].adopted:
            raise ValueError(
                f"download.only_subset: subset {name} filters on similarity in space {space}, which is computed from images: "
                "adopt that space, or filter on LAION's source_similarity"
            )
        ours = self.score_columns(sub)
        if "pwatermark" in ours or (ours and not self.scores_from_adopted()):
            raise ValueError(
                f"download.only_subset: subset {name} thresholds {', '.join(sorted(ours))}, computed from images here: "
                "before the download only heads on adopted spaces and source columns (source_punsafe, source_pwatermark...) can filter"
            )
        return self

    def fetch_filter(self) -> SubsetConfig | None:
        """The subset `download.only_subset` names (None: every row is fetched)."""
        return next((s for s in self.subsets if s.name == self.download.only_subset), None)

    def fetch_filter_tables(self) -> list[str]:
        """What the images stage reads to choose its rows: the subset's rules without images."""
        sub = self.fetch_filter()
        if sub is None:
            return []
        return [
            *(["language"] if sub.uses_language or sub.min_caption_chars is not None else []),
            *([f"embeddings/{self.similarity_space(sub)}"] if sub.min_similarity is not None else []),
            *(["scores"] if self.score_columns(sub) else []),
        ]

    def scores_from_adopted(self) -> bool:
        """Every head reads an adopted space: scores need no image (they run on published vectors)."""
        fed = {self.head_space(name) for name in self.scores.heads}
        return bool(fed) and all(self.embeddings.spaces[space].adopted for space in fed)

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
            f"config file {p}: " + "; ".join(problems) + " (see docs/CONFIGURATION.md)"
        ) from None
