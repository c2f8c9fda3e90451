"""Definitions for the Dagster UI, `dagster dev` and `laion-assets run`, built from Settings.

Automation is applied here, once: each downstream stage runs for a shard when its upstream
stage was materialized and every blocking check upstream passed.
"""

from __future__ import annotations

from dagster import AutomationCondition, Definitions, define_asset_job, map_asset_specs
from dagster_aws.s3 import S3Resource

from laion_assets.core.config import load_config
from laion_assets.defs.embeddings import embeddings_assets
from laion_assets.defs.images import images
from laion_assets.defs.knn import knn_assets
from laion_assets.defs.language import language
from laion_assets.defs.partitions import shards
from laion_assets.defs.raw_urls import raw_urls
from laion_assets.defs.resources import InputsResource, LakeResource, PipelineResource, Settings
from laion_assets.defs.schedules import lake_maintenance, nightly_maintenance
from laion_assets.defs.scores import scores_asset
from laion_assets.defs.sensors import automation, shard_files
from laion_assets.defs.subsets import subset_assets
from laion_assets.defs.webdataset import webdataset_assets

FOLLOW_UPSTREAM = AutomationCondition.eager() & AutomationCondition.all_deps_blocking_checks_passed()


def build_defs(settings: Settings) -> Definitions:
    cfg = load_config(settings.config)
    downstream = map_asset_specs(
        lambda spec: spec.replace_attributes(automation_condition=FOLLOW_UPSTREAM),
        [images, language, embeddings_assets(cfg), scores_asset(cfg), *subset_assets(cfg), *webdataset_assets(cfg)],
    )
    s3 = S3Resource()
    return Definitions(
        assets=[raw_urls, *downstream, *knn_assets(cfg)],  # knn: its own automation (defs/knn.py)
        jobs=[
            define_asset_job("shard_pipeline", partitions_def=shards, description="Every stage for one shard."),
            lake_maintenance,
        ],
        sensors=[shard_files, automation],
        schedules=[nightly_maintenance],
        resources={
            "lake": LakeResource(uri=settings.lake, s3=s3),
            "pipeline": PipelineResource(config_path=settings.config),
            "inputs": InputsResource(location=settings.inputs),
            "s3": s3,
        },
    )


defs = build_defs(Settings.from_env())
