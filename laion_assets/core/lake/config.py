"""What every config section shares (strict, frozen, named like asset keys), and the lake's
own sections: gate thresholds beyond the fixed checks, and table maintenance."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Names that become asset keys and column names (embedding spaces, heads).
NAME = r"^[a-z][a-z0-9_]*$"


class Section(BaseModel):
    """A config section: unknown keys are an error (a typo must not fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class QualityConfig(Section):
    """Gate thresholds beyond the fixed schema and range checks."""

    embedding_norm_tolerance: float = Field(0.01, gt=0)


class MaintenanceConfig(Section):
    vacuum_retention_hours: int = Field(168, ge=0)
    target_file_size_mb: int = Field(128, ge=1)
