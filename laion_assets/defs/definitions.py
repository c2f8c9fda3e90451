"""Definitions for the Dagster UI, `dg dev` and `laion-assets run`, built from Settings.

Policies are applied here, once, for every asset:
- automation: each downstream stage runs for a shard when its upstream stage was materialized
  and every blocking check upstream passed; the lake summary refreshes daily;
- one group, so the lineage opens with the whole chain visible (the UI collapses groups when
  there are several); a `stage` tag tells the layers apart in the catalog;
- owners (LAION_ASSETS_OWNERS), code version, links to the source code, and a freshness policy
  on the lake summary (shards arrive when their files do, so freshness does not apply to them).
"""

from __future__ import annotations

import os
from datetime import timedelta

from dagster import (
    AssetKey,
    AssetSelection,
    AutomationCondition,
    Definitions,
    FreshnessPolicy,
    define_asset_job,
    map_asset_specs,
    with_source_code_references,
)
from dagster_aws.s3 import S3Resource

from laion_assets import __version__
from laion_assets.core.config import load_config
from laion_assets.defs.curation import after_lake_wide, blocklist_files, dedup_keys, lake_wide_assets
from laion_assets.defs.embeddings import embeddings_assets
from laion_assets.defs.executors import executor_for
from laion_assets.defs.images import images, images_asset
from laion_assets.defs.keys import LAKE_PATH, embeddings_key
from laion_assets.defs.knn import knn_assets
from laion_assets.defs.language import language
from laion_assets.defs.raw_urls import raw_urls
from laion_assets.defs.recovery import dead_runs, fix_slot_wait
from laion_assets.defs.resources import InputsResource, LakeResource, PipelineResource, Settings
from laion_assets.defs.schedules import lake_maintenance
from laion_assets.defs.scores import scores_asset
from laion_assets.defs.sensors import automation, shard_files
from laion_assets.defs.subsets import subset_assets
from laion_assets.defs.summary import summary_asset
from laion_assets.defs.webdataset import webdataset_assets

# A stage follows its upstream stages for a shard once their gates passed, or in the same run as
# them: a gate that fails there fails its step, and Dagster skips what follows. (Dagster's own
# all_deps_blocking_checks_passed() counts the gates' checks as requested, which runs that do not
# select the checks never do: defs/gate.py.)
UPSTREAM_PASSED = AutomationCondition.all_deps_match(
    AutomationCondition.all_checks_match(AutomationCondition.check_passed(), blocking_only=True)
    | AutomationCondition.will_be_requested()
).with_label("upstream gates passed, or upstream runs first in the same run")
FOLLOW_UPSTREAM = AutomationCondition.eager() & UPSTREAM_PASSED
SUMMARY_CRON = "0 4 * * *"  # after the nightly maintenance (03:00)
DAILY = AutomationCondition.cron_tick_passed(SUMMARY_CRON).since_last_handled().with_label(f"daily ({SUMMARY_CRON} UTC)")
GROUP = "laion"
# `stage` tag by the first part of the asset's lake path (embeddings/<space>, subsets/<name>...)
STAGES = {
    "raw_urls": "ingest", "images": "download", "language": "ingest", "embeddings": "embed", "scores": "score",
    "subsets": "filter", "webdataset": "export", "knn": "export", "curation": "curate", "lake_summary": "report",
    "watermark": "score",
}
SHARD_JOB = "shard_pipeline"
LAKE_JOB = "lake_pipeline"
fix_slot_wait()  # runs waiting for a pool slot sleep (and hear Ctrl-C) instead of spinning


def _policies(spec):
    owners = [o.strip() for o in os.environ.get("LAION_ASSETS_OWNERS", "team:laion_assets").split(",") if o.strip()]
    summary = spec.key.path[0] == "lake_summary"
    top = spec.metadata.get(LAKE_PATH, spec.key.to_user_string()).split("/")[0]
    return spec.replace_attributes(
        group_name=GROUP, owners=owners, code_version=__version__,
        automation_condition=DAILY if summary else spec.automation_condition,
        freshness_policy=FreshnessPolicy.time_window(fail_window=timedelta(hours=26), warn_window=timedelta(hours=25)) if summary else None,
    ).merge_attributes(tags={"stage": STAGES.get(top, top)})


def _fetch_after(cfg) -> list[AssetKey]:
    """What `download.only_subset` reads to choose the rows images fetches (filter before fetch:
    adopted embeddings, their scores, the language): images runs after them, lineage shows it."""
    keys = {"language": language.key, "scores": AssetKey("scores")}
    return [keys.get(t) or embeddings_key(t.split("/", 1)[1]) for t in cfg.fetch_filter_tables()]


def build_defs(settings: Settings) -> Definitions:
    cfg = load_config(settings.config)
    fetch = images_asset(_fetch_after(cfg)) if cfg.download.only_subset else images
    downstream = [fetch, language, *embeddings_assets(cfg), scores_asset(cfg), dedup_keys, *subset_assets(cfg), *webdataset_assets(cfg)]
    shard_assets = [
        raw_urls,
        *map_asset_specs(after_lake_wide, map_asset_specs(lambda s: s.replace_attributes(automation_condition=FOLLOW_UPSTREAM), downstream)),
    ]
    # across shards; knn and curation: their own automation (defs/knn.py, defs/curation.py)
    lake_assets = [*knn_assets(cfg), *lake_wide_assets(cfg), summary_asset(shard_assets)]
    assets = with_source_code_references(map_asset_specs(_policies, [*shard_assets, *lake_assets]))
    maintenance, nightly = lake_maintenance({s.metadata.get(LAKE_PATH, s.key.to_user_string()): s.key for a in assets for s in a.specs})
    s3 = S3Resource()
    return Definitions(
        assets=assets,
        jobs=[
            # every run of a shard, from the UI, the sensors or `laion-assets run`, is this job
            # (with an asset selection), so any of them can be re-executed from the UI; no
            # checks selected: each stage records its gate itself (defs/gate.py)
            define_asset_job(
                SHARD_JOB, selection=AssetSelection.assets(*shard_assets).without_checks(),
                description="Stages of one shard (all, or the selected assets).",
            ),
            # what spans every shard (curation passes, kNN indexes, the lake summary): one run
            # after the shards, from `laion-assets run` too, re-executable from the UI
            define_asset_job(
                LAKE_JOB, selection=AssetSelection.assets(*lake_assets).without_checks(),
                description="Lake-wide assets (all, or the selected ones), after the shards they read.",
            ),
            maintenance,
        ],
        # A shard's stages are a chain: by default one process per run starts each stage
        # without a new interpreter (5-10 s of imports each) and keeps the model loaded, as
        # `laion-assets run` does; scale-out is many runs at once (run queue, launchers). A
        # deployment may send steps elsewhere instead (LAION_ASSETS_EXECUTOR: celery, k8s).
        executor=executor_for(settings.executor, settings.celery_config),
        sensors=[shard_files, automation, blocklist_files, dead_runs],
        schedules=[nightly],
        resources={
            "lake": LakeResource(uri=settings.lake, s3=s3),
            "pipeline": PipelineResource(config_path=settings.config),
            "inputs": InputsResource(location=settings.inputs),
            "s3": s3,
        },
    )


defs = build_defs(Settings.from_env())
