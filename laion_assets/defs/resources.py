"""Resources: where the lake and the inputs live, and the pipeline config.

Local and cloud differ only in these settings (environment variables or resource config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dagster import ConfigurableResource
from dagster_aws.s3 import S3Resource

from laion_assets.core.config import PipelineConfig, load_config
from laion_assets.core.lake.delta import Lake


@dataclass(frozen=True)
class Settings:
    """Deployment settings; `from_env` reads LAION_ASSETS_LAKE / _INPUT / _CONFIG, and
    LAION_ASSETS_EXECUTOR / _CELERY_CONFIG for where steps run (defs/executors.py)."""

    lake: str = "data/lake"
    inputs: str = "data/input"
    config: str | None = None
    executor: str = "in_process"
    celery_config: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            lake=os.environ.get("LAION_ASSETS_LAKE", cls.lake),
            inputs=os.environ.get("LAION_ASSETS_INPUT", cls.inputs),
            config=os.environ.get("LAION_ASSETS_CONFIG") or None,
            executor=os.environ.get("LAION_ASSETS_EXECUTOR") or cls.executor,
            celery_config=os.environ.get("LAION_ASSETS_CELERY_CONFIG") or None,
        )


class LakeResource(ConfigurableResource):
    """The lake root: a local folder or s3://bucket/prefix. For S3, region/endpoint come from
    the `s3` resource (dagster-aws) so the lake and input listing share one AWS setup."""

    uri: str
    s3: S3Resource | None = None

    def lake(self) -> Lake:
        options = {}
        if self.uri.startswith("s3://") and self.s3 is not None:
            if self.s3.region_name:
                options["AWS_REGION"] = self.s3.region_name
            if self.s3.endpoint_url:
                options["AWS_ENDPOINT_URL"] = self.s3.endpoint_url
                options["AWS_ALLOW_HTTP"] = str(self.s3.endpoint_url.startswith("http://")).lower()
        return Lake(self.uri, options or None)


class PipelineResource(ConfigurableResource):
    """The pipeline config file (YAML; see docs/CONFIGURATION.md); empty means the built-in defaults."""

    config_path: str | None = None

    def config(self) -> PipelineConfig:
        return load_config(self.config_path)


class InputsResource(ConfigurableResource):
    """Where new shard files appear: a local folder or an s3:// prefix."""

    location: str
