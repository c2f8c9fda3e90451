"""What a subset keeps: one typed rule per subset, optionally starting from a published preset.

Every rule has a name (it becomes the reason a dropped row is counted under): LAION's
pre-filters (caption length, original image bytes), image size, the caption language
(including LAION's `nolang`), the CLIP similarity in a named space, and thresholds on any score
column (`at_least` >=, `above` >, `below` <): our heads' columns, our `pwatermark`, or a source
column such as LAION's own `source_pwatermark`. A row whose value is missing fails the
threshold. Fields of earlier versions (`max_punsafe`, `min_aesthetic`, `max_pwatermark`) are
read into the new ones. Issues adding subset options (dedup, blocklists) add fields here and a
rule in `core/subsets.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.subsets.presets import PRESETS

# fields of earlier versions -> (threshold group, column)
OLD_FIELDS = {
    "max_punsafe": ("below", "punsafe"),
    "min_aesthetic": ("at_least", "aesthetic"),
    "max_pwatermark": ("below", "source_pwatermark"),  # it always read LAION's source column
}
THRESHOLDS = ("at_least", "above", "below")


class SubsetConfig(BaseModel):
    """A named subset rule; `None` / empty fields are not applied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    preset: str | None = Field(None, description="published rule it starts from (docs/LAION.md); fields here override it")
    description: str = ""
    similarity_space: str | None = Field(None, description="space of min_similarity (default: the one whose model is similarity_model, else the only one)")
    similarity_model: str | None = Field(None, description="model the similarity threshold was published for, e.g. ViT-B-32/openai")
    min_similarity: float | None = Field(None, ge=-1, le=1, description="image-text cosine >= this")
    languages: tuple[str, ...] | None = Field(None, description="keep these caption languages (ISO codes, or nolang)")
    exclude_languages: tuple[str, ...] = Field((), description="drop these caption languages (ISO codes, or nolang)")
    min_language_confidence: float | None = Field(None, ge=0, le=1, description="below it a caption counts as nolang")
    at_least: dict[str, float] = Field(default_factory=dict, description="column -> keep rows with value >= this")
    above: dict[str, float] = Field(default_factory=dict, description="column -> keep rows with value > this")
    below: dict[str, float] = Field(default_factory=dict, description="column -> keep rows with value < this")
    min_caption_chars: int | None = Field(None, ge=0, description="LAION: alt text shorter than 5 characters dropped")
    min_image_bytes: int | None = Field(None, ge=0, description="LAION: original images under 5 KB dropped")
    min_width: int | None = Field(None, ge=0, description="original width")
    min_height: int | None = Field(None, ge=0, description="original height")
    exclude_duplicates: tuple[Literal["url", "sha256", "phash"], ...] = Field(
        (), description="lake-wide duplicate kinds to drop (the survivor of each group stays); blocked rows always leave"
    )

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data):
        """Old fields into threshold groups; a preset's fields under the ones given."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, (group, column) in OLD_FIELDS.items():
            if old in data:
                value = data.pop(old)
                if value is not None:
                    data[group] = {**data.get(group, {}), column: value}
        preset = data.get("preset")
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
            base = dict(PRESETS[preset]["rule"])
            for group in THRESHOLDS:
                if group in data:
                    data[group] = {**base.get(group, {}), **data[group]}
            data = {"name": preset, "description": PRESETS[preset]["description"], **base, **data}
        return data

    @property
    def threshold_columns(self) -> set[str]:
        return {c for group in THRESHOLDS for c in getattr(self, group)}

    @property
    def uses_language(self) -> bool:
        return self.languages is not None or bool(self.exclude_languages) or self.min_language_confidence is not None

    def rule(self) -> dict:
        """Everything that decides which rows are kept (not the description): stored in the
        recipe, and `SubsetConfig(**rule)` gives the same subset back."""
        return self.model_dump(mode="json", exclude={"description"})


def from_recipe(recipe: dict) -> SubsetConfig:
    """The subset a stored recipe describes (its similarity space pinned to the one it used)."""
    try:
        rule = dict(recipe["rule"])
    except (KeyError, TypeError):
        raise LaionAssetsError("not a subset recipe: it has no 'rule'") from None
    if recipe.get("similarity"):
        rule["similarity_space"] = recipe["similarity"]["space"]
    preset = rule.pop("preset", None)  # the rule is complete: today's preset must not add to it
    return SubsetConfig.model_validate(rule).model_copy(update={"preset": preset})
