"""Delta maintenance: compact small files and vacuum old ones, nightly. Each table's result is
recorded on its asset (an observation in its event history) and on the run, not only logged;
tables that are no asset (the registry, staging, raw_urls_rejected) only on the run."""

from dagster import (
    AssetKey,
    AssetObservation,
    DefaultScheduleStatus,
    JobDefinition,
    OpExecutionContext,
    Output,
    ScheduleDefinition,
    job,
    op,
)

from laion_assets.core.stages import staging
from laion_assets.defs.gate import markdown_table
from laion_assets.defs.resources import LakeResource, PipelineResource


def lake_maintenance(assets: dict[str, AssetKey]) -> tuple[JobDefinition, ScheduleDefinition]:
    """The maintenance job and its nightly schedule; `assets`: lake path -> asset key of the
    tables that are assets (their results are observations on them)."""

    @op
    def maintain_lake(context: OpExecutionContext, lake: LakeResource, pipeline: PipelineResource):
        """Staging left by a kill after its shard was published is removed; then compaction (not
        of staging, which running shards append to) and a real vacuum (dry_run=False) keeping
        `vacuum_retention_hours`, which also removes the files of publishes killed before their
        commit once they are older than the retention (and at least an hour)."""
        import polars as pl

        lk = lake.lake()
        cfg = pipeline.config().maintenance
        for name in staging.sweep(lk):
            context.log.info(f"{name}: leftover staging of a published shard removed")
        rows = []
        for name in lk.tables():
            if name.startswith("_staging/"):
                stats = {"files_vacuumed": len(lk.vacuum(name, cfg.vacuum_retention_hours))}
            else:
                stats = lk.maintain(name, cfg.vacuum_retention_hours, cfg.target_file_size_mb)
            context.log.info(f"{name}: {stats}")
            rows.append({"table": name, **stats})
            if name in assets:
                context.log_event(AssetObservation(asset_key=assets[name], metadata={"maintenance": stats}))
        summary = markdown_table(pl.DataFrame(rows)) if rows else "no tables"
        yield Output(None, metadata={"tables": len(rows), "maintenance": summary})

    @job(name="lake_maintenance", description="Compact and vacuum every Delta table of the lake.")
    def maintenance():
        maintain_lake()

    # on from the start, like the sensors: a lake nobody remembered to switch this on for keeps
    # every superseded file and small file forever
    nightly = ScheduleDefinition(
        name="nightly_maintenance", job=maintenance, cron_schedule="0 3 * * *", default_status=DefaultScheduleStatus.RUNNING,
    )
    return maintenance, nightly
