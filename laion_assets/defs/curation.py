"""Curation across the whole lake: the key index per shard, the lake-wide duplicates and
blocklist passes (between the per-shard stages and the subsets in lineage), SemDeDup per
subset, and the sensor on the blocklist location.

The lake-wide passes are incremental and update the published subsets themselves (rows taken
out in one new Delta version per subset), and the subsets' webdataset tars and kNN indexes
with them; they log a materialization for every subset shard, export shard and index they
changed. They share the `curation` pool: one pass at a time.
"""

import json

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    AssetsDefinition,
    AssetSelection,
    AssetSpec,
    AutomationCondition,
    DefaultSensorStatus,
    Failure,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    asset,
    sensor,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG, get_input_data_version_tag, get_input_event_pointer_tag

from laion_assets.core.config import PipelineConfig
from laion_assets.core.curation import blocklists
from laion_assets.core.curation.config import SemanticDedupConfig
from laion_assets.core.curation.semdedup import semdedup_table
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.stages import curation as stages
from laion_assets.core.stages import lakewide
from laion_assets.defs.gate import markdown_table
from laion_assets.defs.images import images
from laion_assets.defs.keys import embeddings_key, knn_key, lake_path, semdedup_key, subset_key, webdataset_key
from laion_assets.defs.partitions import shard_asset
from laion_assets.defs.resources import LakeResource, PipelineResource

DEDUP_KEYS = AssetKey(["curation", "dedup_keys"])
DUPLICATES = AssetKey(["curation", "duplicates"])
BLOCKED = AssetKey(["curation", "blocked"])
LAKE_WIDE = [DUPLICATES, BLOCKED]  # what every subset depends on
# A lake-wide asset runs when any shard upstream changed, one run at a time; it does not wait
# for every shard (a shard that failed upstream must not hold the whole lake back).
LAKE_WIDE_AUTOMATION = AutomationCondition.any_deps_updated().since_last_handled() & ~AutomationCondition.in_progress()


def _metadata(report: dict) -> dict:
    """Frames become markdown tables (per shard), the rest JSON or plain values."""
    out = {}
    for k, v in report.items():
        if hasattr(v, "height"):
            out[k] = MetadataValue.md(markdown_table(v.head(200)) if v.height else "none")
        elif isinstance(v, (dict, list)):
            out[k] = MetadataValue.json(json.loads(json.dumps(v, default=str)))
        else:
            out[k] = MetadataValue.text("") if v is None else v
    return out


def _log_subset_changes(context, report: dict) -> None:
    """A materialization event for each subset shard a pass changed (rows removed or re-run),
    then for the webdataset shards and kNN index it brought up to date with them: the UI shows
    the exports in sync with the subset (an export left behind shows as unsynced)."""
    by = {"changed_by": context.asset_key.to_user_string()}
    for name, change in report.get("subsets_updated", {}).items():
        shards = {**{s: n for s, n in change.get("per_shard", {}).items()}, **{s: None for s in change.get("shards_rerun", [])}}
        for shard, removed in shards.items():
            context.log_event(AssetMaterialization(
                asset_key=subset_key(name), partition=shard,
                metadata={"delta_version": change["version"], **by,
                          **({"rows_removed": removed} if removed is not None else {"rerun": True})},
                tags={DATA_VERSION_TAG: f"{name}/{shard}/v{change['version']}"},
            ))
        for shard in change.get("webdataset_shards_rewritten", []):
            context.log_event(AssetMaterialization(
                asset_key=webdataset_key(name), partition=shard, metadata={"subset_version": change["version"], **by},
                tags=_made_from_new_subset(context.instance, webdataset_key(name), subset_key(name), shard),
            ))
        if "knn_version" in change:
            context.log_event(AssetMaterialization(asset_key=knn_key(name), metadata={"version": change["knn_version"], "subset_version": change["version"], **by}))


def _made_from_new_subset(instance, key: AssetKey, subset: AssetKey, shard: str) -> dict:
    """The provenance tags Dagster's own step would record for an export shard the pass wrote:
    its previous inputs, with the subset shard's event just logged as its subset input (without
    them the UI calls the export unsynced although it follows the subset)."""
    def latest(k: AssetKey):
        records = instance.fetch_materializations(AssetRecordsFilter(asset_key=k, asset_partitions=[shard]), limit=1).records
        return records[0] if records else None

    before, now = latest(key), latest(subset)
    tags = dict(before.asset_materialization.tags or {}) if before else {}
    if now is not None:
        version = (now.asset_materialization.tags or {}).get(DATA_VERSION_TAG, str(now.storage_id))
        tags[get_input_data_version_tag(subset)] = version
        tags[get_input_event_pointer_tag(subset)] = str(now.storage_id)
        tags[DATA_VERSION_TAG] = f"{key.to_user_string()}/{shard}/{version}"
    return tags


def _guard(fn):
    try:
        return fn()
    except LaionAssetsError as e:
        raise Failure(description=str(e), allow_retries=False) from None


@shard_asset(key=DEDUP_KEYS, deps=[images], kinds={"delta"}, group_name="curation")
def dedup_keys(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource) -> MaterializeResult:
    """This shard's entries in the lake-wide key index (`curation/dedup_keys`): normalised URL,
    sha256 of the image bytes, and the bands of the pHash of every stored image. A shard
    replaces its own entries in one commit; concurrent shard runs keep one copy each."""
    lk = lake.lake()
    report = _guard(lambda: stages.run_dedup_keys(lk, pipeline.config(), context.partition_key))
    return MaterializeResult(metadata={"dagster/row_count": report["entries"], "dagster/uri": lk.table_uri("curation/dedup_keys"), **_metadata(report)})


@asset(key=DUPLICATES, deps=[dedup_keys], kinds={"delta"}, group_name="curation", pool="curation",
       automation_condition=LAKE_WIDE_AUTOMATION)
def duplicates(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource) -> MaterializeResult:
    """Exact (url, sha256) and perceptual (pHash within `curation.dedup.phash_distance`)
    duplicates across every shard: a row is marked with the smallest (shard, uid) that it
    duplicates; survivors are unmarked. Incremental: only key groups touched since the last
    pass are recomputed. Subsets with `exclude_duplicates` lose the new duplicates."""
    lk, cfg = lake.lake(), pipeline.config()
    report = _guard(lambda: lakewide.tracked(lk, cfg, "curation/duplicates", lambda: stages.run_duplicates(lk, cfg)))
    _log_subset_changes(context, report)
    context.log.info(f"duplicates pass ({report['mode']}): new {report['newly_marked']}, total {report['duplicates_total']}")
    return MaterializeResult(metadata={
        "dagster/row_count": sum(report["duplicates_total"].values()), "dagster/uri": lk.table_uri("curation/duplicates"), **_metadata(report),
    })


@asset(key=BLOCKED, deps=[images], kinds={"delta"}, group_name="curation", pool="curation",
       automation_condition=LAKE_WIDE_AUTOMATION)
def blocked(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource) -> MaterializeResult:
    """Rows matching a hash blocklist (files `<name>.<kind>.txt` in `curation.blocklists.location`),
    in every shard. Each pass publishes its diff (`curation/blocklist_diff` and a parquet + CSV
    file) and takes newly blocked rows out of every subset in a new Delta version. Runs when
    shards change and when the lists change (sensor `blocklist_files`)."""
    lk, cfg = lake.lake(), pipeline.config()
    report = _guard(lambda: lakewide.tracked(lk, cfg, "curation/blocked", lambda: stages.run_blocklists(lk, cfg)))
    _log_subset_changes(context, report)
    context.log.info(f"blocklist pass ({report['mode']}): {report['rows_blocked_total']} rows blocked, diff {report['diff_rows']}")
    return MaterializeResult(metadata={
        "dagster/row_count": report["rows_blocked_total"], "dagster/uri": lk.table_uri("curation/blocked"), **_metadata(report),
    })


def semdedup_asset(sem: SemanticDedupConfig, cfg: PipelineConfig) -> AssetsDefinition:
    space = cfg.semantic_space(sem)

    @asset(
        key=semdedup_key(sem.subset), deps=[subset_key(sem.subset), embeddings_key(space)],
        metadata=lake_path(semdedup_table(sem.subset)),
        kinds={"delta", "faiss"}, group_name="curation", pool="curation", automation_condition=LAKE_WIDE_AUTOMATION,
        description=(
            f"SemDeDup of subset `{sem.subset}` in space `{space}`: k-means (k={sem.clusters}), rows with cosine "
            f"> {sem.threshold} to a row before them in their cluster (least similar to the centroid first) are marked. "
            f"Read the deduplicated subset as subsets/{sem.subset} anti-joined on uid with this table."
        ),
    )
    def _semdedup(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource) -> MaterializeResult:
        lk = lake.lake()
        cfg_now = pipeline.config()
        current = next(s for s in cfg_now.curation.semantic if s.subset == sem.subset)
        report = _guard(lambda: lakewide.tracked(lk, cfg_now, semdedup_table(sem.subset), lambda: stages.run_semdedup(lk, cfg_now, current)))
        return MaterializeResult(metadata={"dagster/row_count": report["removed"], **_metadata(report)})

    return _semdedup


def lake_wide_assets(cfg: PipelineConfig) -> list[AssetsDefinition]:
    return [duplicates, blocked, *(semdedup_asset(sem, cfg) for sem in cfg.curation.semantic)]


def after_lake_wide(spec: AssetSpec) -> AssetSpec:
    """Subsets come after the lake-wide passes in lineage, but a pass does not re-run every
    subset shard through automation: it updates the published subsets itself."""
    if spec.key.path[0] != "subsets":
        return spec
    return spec.merge_attributes(deps=LAKE_WIDE).replace_attributes(
        automation_condition=spec.automation_condition.ignore(AssetSelection.assets(*LAKE_WIDE)),
    )


@sensor(
    asset_selection=AssetSelection.assets(BLOCKED), minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
    description="Runs the blocklist pass when the list files in curation.blocklists.location change.",
)
def blocklist_files(context: SensorEvaluationContext, pipeline: PipelineResource):
    location = pipeline.config().curation.blocklists.location
    if not location:
        return SkipReason("no curation.blocklists.location configured")
    try:
        sig = blocklists.signature(location)
    except OSError as e:
        return SkipReason(f"cannot list {location}: {e}")
    if sig == context.cursor:
        return SkipReason(f"lists in {location} unchanged")
    context.update_cursor(sig)
    return RunRequest(run_key=f"blocklists:{sig}")
