"""Shard discovery: new files in the input location become partitions and runs."""


from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset

from laion_assets.core.ingest import registry
from laion_assets.core.ingest.reader import scan_inputs
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.defs.backfills import add_partitions
from laion_assets.defs.partitions import shards
from laion_assets.defs.raw_urls import raw_urls
from laion_assets.defs.resources import InputsResource, LakeResource

# A drop of more new shard files than this is registered in one bulk insert and handed over as
# one backfill of raw_urls (the backfill daemon paces the runs; one item with progress in the
# UI). Below it, the tick asks for the partitions and one run each, as usual. At scale the
# usual way strains: the sensor daemon checks every requested partition key with two queries
# and creates requested runs one by one inside the tick, ~1 s each on a busy 2-core box
# (benchmarks/bench_partitions.py: 60,000 keys held the tick for over 5 minutes before any
# partition was added).
BACKFILL_ABOVE = 100


@sensor(
    asset_selection=[raw_urls],
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Registers new shard files in the input location as partitions and requests their raw_urls runs. "
        "A shard whose file disappeared is removed (lake rows and partition) if nothing of it was published; "
        "a published one is kept and reported: remove it with `laion-assets remove-shard KEY`."
    ),
)
def shard_files(context: SensorEvaluationContext, inputs: InputsResource, lake: LakeResource):
    try:
        scan = scan_inputs(inputs.location)
    except LaionAssetsError as e:
        return SkipReason(str(e))
    files = scan.files
    lk = lake.lake()
    registry.register(lk, files)  # raises on a key clash: the tick fails with the message
    present = set(files)
    on_disk = {key for key, source in registry.registered(lk).items() if source in present}
    partitions = set(context.instance.get_dynamic_partitions(shards.name))
    new = sorted(on_disk - partitions)
    skipped = "; ".join(f"{path.rsplit('/', 1)[-1]}: {why}" for path, why in scan.skipped[:20])
    skipped = f"; skipped {skipped}" if skipped else ""
    gone = registry.missing(lk, inputs.location, files)
    unpublished = sorted(k for k in gone if not registry.is_published(lk, k))
    for key in unpublished:  # nothing to keep: the shard's partition would only ever fail
        registry.remove_shard(lk, key)
    kept = sorted(set(gone) - set(unpublished))
    note = (
        f"; {len(kept)} published shards lost their file and are kept: {kept[:10]} (remove them with "
        f"`laion-assets remove-shard {' '.join(kept[:10])}`)" if kept else ""
    )
    requests = []
    bulk = len(new) > BACKFILL_ABOVE
    if new:
        context.log.info(f"registering {len(new)} new shards: {new[:10]}{skipped}")
        if bulk:
            add_partitions(context.instance, new)  # `new` is already a diff: one insert (a CLI's race retried)
        else:
            requests.append(shards.build_add_request(new))
    removed = sorted(set(unpublished) & partitions)
    if removed:
        context.log.info(f"removing {len(removed)} unpublished shards whose file is gone: {removed[:10]}")
        requests.append(shards.build_delete_request(removed))
    if not new and not requests:
        return SkipReason(f"no new shard files in {inputs.location} ({len(files)} known){skipped}{note}")
    if note:
        context.log.warning(note[2:])
    if bulk:
        subset = AssetGraphSubset(partitions_subsets_by_asset_key={raw_urls.key: shards.empty_subset().with_partition_keys(new)})
        runs = [RunRequest.for_asset_graph_subset(subset, tags={"laion_assets/launched_by": "shard_files"})]
    else:
        when = registry.registered_at(lk)
        # keyed by registration time: a shard removed and added again runs again
        runs = [RunRequest(partition_key=k, run_key=f"raw_urls:{k}:{when.get(k, '')}") for k in new]
    return SensorResult(dynamic_partitions_requests=requests, run_requests=runs)


automation = AutomationConditionSensorDefinition(
    "stage_automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    description="Runs each stage for a shard once its upstream stage is materialized and passed its blocking checks.",
)
