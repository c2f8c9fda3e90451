"""Delta maintenance: compact small files and vacuum old ones, nightly."""

from dagster import OpExecutionContext, ScheduleDefinition, job, op

from laion_assets.defs.resources import LakeResource, PipelineResource


@op
def maintain_lake(context: OpExecutionContext, lake: LakeResource, pipeline: PipelineResource) -> None:
    """Compaction, then a real vacuum (dry_run=False) keeping `vacuum_retention_hours`."""
    lk = lake.lake()
    cfg = pipeline.config().maintenance
    for name in lk.tables():
        stats = lk.maintain(name, cfg.vacuum_retention_hours, cfg.target_file_size_mb)
        context.log.info(f"{name}: {stats}")


@job(description="Compact and vacuum every Delta table of the lake.")
def lake_maintenance():
    maintain_lake()


nightly_maintenance = ScheduleDefinition(name="nightly_maintenance", job=lake_maintenance, cron_schedule="0 3 * * *")
