"""Shard discovery: new files in the input location become partitions and runs."""


from dagster import (
    AutomationConditionSensorDefinition,
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from laion_assets.core import registry
from laion_assets.core.errors import LaionAssetsError
from laion_assets.core.ingest import scan_inputs
from laion_assets.defs.partitions import shards
from laion_assets.defs.raw_urls import raw_urls
from laion_assets.defs.resources import InputsResource, LakeResource


@sensor(
    target=[raw_urls],
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Registers new shard files in the input location as partitions and requests their raw_urls runs.",
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
    new = sorted(on_disk - set(context.instance.get_dynamic_partitions(shards.name)))
    skipped = "; ".join(f"{path.rsplit('/', 1)[-1]}: {why}" for path, why in scan.skipped[:20])
    skipped = f"; skipped {skipped}" if skipped else ""
    if not new:
        return SkipReason(f"no new shard files in {inputs.location} ({len(files)} known){skipped}")
    context.log.info(f"registering {len(new)} new shards: {new[:10]}{skipped}")
    return SensorResult(
        dynamic_partitions_requests=[shards.build_add_request(new)],
        run_requests=[RunRequest(partition_key=k, run_key=f"raw_urls:{k}") for k in new],
    )


automation = AutomationConditionSensorDefinition(
    "stage_automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    description="Runs each stage for a shard once its upstream stage is materialized and passed its blocking checks.",
)
