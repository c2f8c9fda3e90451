"""How `laion-assets run` runs a shard: the stages already published and up to date are
skipped (and their leftover staging removed), one Dagster run materializes the others, each
stage gets a summary line, and the files the run superseded are removed afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field

from laion_assets.core.lake.errors import InfrastructureError, explain


@dataclass
class StageLine:
    shard: str
    asset: str
    status: str  # materialized | failed | skipped
    rows: int | None = None
    version: int | None = None
    detail: str = ""


@dataclass
class RunSummary:
    lines: list[StageLine] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # dead runs recovered, garbage removed
    infrastructure: InfrastructureError | None = None  # a step failed on the machine or store: stop
    running: tuple[str, list[str]] | None = None  # the shard (or "(lake)") and tables of the run in progress

    def interrupted(self) -> None:
        """Name the tables of the run a Ctrl-C or SIGTERM stopped before it could report them."""
        if self.running:
            key, tables = self.running
            done = {line.asset for line in self.lines if line.shard == key}
            self.lines += [StageLine(key, t, "interrupted", detail=f"{INTERRUPTED} (Ctrl-C or SIGTERM): rerun to resume") for t in tables if t not in done]
            self.running = None

    @property
    def ok(self) -> bool:
        return all(line.status in ("materialized", UP_TO_DATE) for line in self.lines)

    def print(self) -> None:
        width = max([len(line.asset) for line in self.lines] + [10])
        for line in self.lines:
            rows = f"{line.rows} rows" if line.rows is not None else ""
            version = f"v{line.version}" if line.version is not None else ""
            print(f"  {line.shard:<16} {line.asset:<{width}} {line.status:<13} {rows:>11} {version:>5}  {line.detail}")
        for note in self.notes:
            print(f"  note: {note}")


UP_TO_DATE = "up to date"


def skip_up_to_date(lk, cfg, order, paths, shard, force, retry_failures, summary) -> list:
    """The selected asset keys to run for a shard; the others are up to date and get a line
    saying so (their leftover staging, if a kill left some, is removed). `paths`: each asset's
    table, which names it in the summary."""
    from laion_assets.core.stages import fingerprints, staging

    from laion_assets.core.exports.webdataset import current_export

    tables = [paths[k] for k in order]
    redo = set(tables) if force else ({"images"} & set(tables) if retry_failures else set())
    plan = fingerprints.plan(lk, cfg, tables, shard, redo)
    to_run = []
    for key, table in zip(order, tables):
        rec = plan[table]
        if table.startswith("webdataset/") and table not in redo:  # an export keeps its own record (stats.json)
            subset = table.split("/", 1)[1]
            ran = any(plan.get(up, "absent") is None for up in (f"subsets/{subset}", "images"))
            stats = None if ran else current_export(lk, cfg, subset, shard)
            if stats is not None:
                summary.lines.append(StageLine(shard, table, UP_TO_DATE, stats["samples"], stats["subset_version"], "tars made from the subset as it is; --force redoes them"))
                continue
        if rec is None:
            to_run.append(key)
            continue
        if staging.leftover(lk, table, shard):
            lk.drop_shard(staging.table_for(table), shard)
        summary.lines.append(StageLine(shard, table, UP_TO_DATE, version=rec.version, detail="published from the same inputs, config and code; --force redoes it"))
    return to_run


def lake_wide_to_run(lk, cfg, lake_order, graph, paths, force, summary) -> list:
    """The selected lake-wide assets to run: those whose inputs, config or code changed since
    they last succeeded, and whatever reads what they write (a pass changes subsets, which the
    kNN indexes and the summary read); the others get a line saying they are up to date."""
    from laion_assets.core.stages import lakewide

    to_run: list = []
    for key in lake_order:
        ancestors = _ancestors(graph, key)
        if force or not lakewide.up_to_date(lk, cfg, paths[key]) or any(k in ancestors for k in to_run) or (paths[key] == lakewide.SUMMARY and to_run):
            to_run.append(key)
        else:
            summary.lines.append(StageLine("(lake)", paths[key], UP_TO_DATE, detail="what it reads is unchanged since it last ran; --force redoes it"))
    return to_run


def _ancestors(graph, key) -> set:
    seen, todo = set(), [key]
    while todo:
        for parent in graph.get(todo.pop()).parent_keys:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


INTERRUPTED = "interrupted"


def execute_shard(job, graph, paths, instance, shard, keys, retry_failures, summary) -> None:
    """One Dagster run materializing `keys` for a shard; a line per asset in `summary`."""
    from laion_assets.defs.runs import run_shard

    run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    if retry_failures and any(k.to_user_string() == "images" for k in keys):
        run_config["ops"] = {"images": {"config": {"retry_failures": True}}}
    summary.running = (shard, [paths[k] for k in keys])
    summarize(summary, shard, keys, graph, paths, run_shard(instance, job, shard, keys, run_config))
    summary.running = None


def summarize(summary: RunSummary, key: str, order, graph, paths, result) -> None:
    """One summary line per selected asset of a finished run, named by its table (`paths`):
    materialized, failed (a step stopped by Ctrl-C or SIGTERM says so), skipped."""
    from dagster import DagsterEventType

    materialized, failed = {}, {}
    for event in result.all_events:
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            mat = event.event_specific_data.materialization
            materialized[mat.asset_key] = mat.metadata
        elif event.event_type == DagsterEventType.STEP_FAILURE:
            err = event.event_specific_data.error
            msg = event.event_specific_data.user_failure_data.description if event.event_specific_data.user_failure_data else (err.message if err else "")
            failed[event.step_key] = (msg or "").strip().splitlines()[0] if msg else "failed"
            if err is not None and err.cls_name in ("DagsterExecutionInterruptedError", "KeyboardInterrupt"):
                failed[event.step_key] = f"{INTERRUPTED} (Ctrl-C or SIGTERM): rerun to resume"
            elif err is not None and (infra := infrastructure_error(err)) is not None:
                failed[event.step_key] = str(infra)
                summary.infrastructure = summary.infrastructure or infra
        elif event.event_type == DagsterEventType.RUN_FAILURE and "interrupted" in (event.message or "").lower() and not failed:
            failed[None] = f"{INTERRUPTED} (Ctrl-C or SIGTERM) while waiting for a pool slot: rerun to resume"
    for asset_key in order:
        name = paths[asset_key]
        node = graph.get(asset_key)
        step = node.assets_def.node_def.name
        if asset_key in materialized:
            md = materialized[asset_key]
            rows = md.get("dagster/partition_row_count") or md.get("dagster/row_count")
            version = md.get("delta_version")
            detail = "gate passed" if node.check_keys else ""
            summary.lines.append(StageLine(key, name, "materialized", getattr(rows, "value", rows), getattr(version, "value", version), detail))
        elif step in failed or None in failed:
            summary.lines.append(StageLine(key, name, "FAILED", detail=failed.get(step) or failed[None]))
        else:
            summary.lines.append(StageLine(key, name, "skipped", detail="upstream failed or its gate did not pass"))


def infrastructure_error(err) -> InfrastructureError | None:
    """The one-line error of a step that failed on the machine or the store: stages explain
    their own (InfrastructureError), other steps (exports, passes) raise the low-level error,
    recognised here from its message or its cause's when it is a write failure (a missing file
    there may well be a wrong path in the config: that failure keeps its own message)."""
    if err.cls_name == "InfrastructureError":
        return InfrastructureError(err.message.strip(), "step")
    while err is not None:
        found = explain(Exception(err.message)) if err.cls_name not in ("LaionAssetsError", "ValidationFailed") else None
        if found is not None and found.kind in ("disk_full", "permission", "object_store"):
            return found
        err = err.cause
    return None


def remove_garbage(lk, cfg, tables: set[str]) -> list[str]:
    """After a run: remove the files that the tables it published (and their staging) no
    longer need, keeping what `maintenance.vacuum_retention_hours` protects."""
    from laion_assets.core.stages import staging

    removed = 0
    for table in sorted(tables | {t for t in (staging.table_for(x) for x in tables) if t}):
        if lk.exists(table):
            removed += len(lk.vacuum(table, cfg.maintenance.vacuum_retention_hours))
    return [f"removed {removed} files no version within the retention ({cfg.maintenance.vacuum_retention_hours} h) reads"] if removed else []
