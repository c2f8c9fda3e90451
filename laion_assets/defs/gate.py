"""Write-audit-publish in Dagster terms: run a core stage, turn its report into the shard's
`quality_gate` check result and its numbers into materialization metadata.

The check is partitioned by shard: each shard has its own result and history, so one bad shard
does not turn the others red. A failed gate records each failing expectation (threshold and
observed value) and the stage's figures on the check, fails the step with one line, and
publishes nothing, so the UI shows no materialization for it. Expected, user-caused failures
(a missing shard file, a bad config) fail the same way, without a stack trace.

The shard jobs, the CLI and the automation sensor run stages without selecting their checks,
and each stage records its gate as a check evaluation of its own step. A selected check is
planned when its run starts, and Dagster shows a planned check whose step never ran (a later
stage of a shard that failed earlier) as "Execution failed": the gates of stages that did not
run would look failed for that shard. A run that does select the check (materializing one
asset from its page) gets the result as Dagster expects it. Backfills select every check of
their assets (Dagster gives no choice there): when a stage fails in such a run, the gates
Dagster planned for the stages after it are taken back (`_forget_later_gates`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    Failure,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
)
from dagster._core.definitions.metadata import normalize_metadata
from dagster._core.errors import DagsterUserCodeProcessError
from dagster._utils.error import SerializableErrorInfo

from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError, ValidationFailed
from laion_assets.core.stages import StageOutput
from laion_assets.core.ui import pictures
from laion_assets.core.ui.columns import describe
from laion_assets.defs.partitions import shards

GATE = "quality_gate"


def gate_spec(key: str | AssetKey) -> AssetCheckSpec:
    return AssetCheckSpec(
        GATE, asset=key, blocking=True, partitions_def=shards,
        description="great-expectations suite run on the shard before it is published; one result per shard",
    )


class ShardFailed(Failure, DagsterUserCodeProcessError):
    """A step failure shown as its one-line message. Dagster serialises a
    DagsterUserCodeProcessError as the error info it carries (meant for errors forwarded from
    another process), so the run log, the CLI and the UI show the message and the failure
    metadata without a stack of framework frames; `Failure` keeps the metadata and no retries.
    `kind` is the error's class: an InfrastructureError stops a CLI run (exit 2)."""

    def __init__(self, message: str, metadata: dict | None = None, kind: str = "LaionAssetsError"):
        DagsterUserCodeProcessError.__init__(
            self, message, user_code_process_error_infos=[SerializableErrorInfo(message, [], kind)]
        )
        self.description, self.metadata, self.allow_retries = message, normalize_metadata(metadata or {}), False


def table_schema(schema: pa.Schema, table: str) -> TableSchema:
    return TableSchema(columns=[TableColumn(f.name, str(f.type), description=describe(table, f.name)) for f in schema])


def markdown_table(df: pl.DataFrame) -> str:
    """Rows as a markdown table; floats to 4 digits; URLs as code, so the UI does not link to
    servers that may be gone."""
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for row in df.iter_rows():
        cells = ["" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", "\\|") for v in row]
        cells = [f"`{c}`" if "://" in c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _value(v):
    """Metadata values: dicts and lists as JSON, floats to 3 significant digits (the UI plots
    numbers over time; unrounded means and timings turn those plots into noise)."""
    if isinstance(v, (dict, list)):
        return MetadataValue.json(json.loads(json.dumps(v, default=str)))
    if v is None:
        return MetadataValue.text("")
    if isinstance(v, float):
        return float(f"{v:.3g}")
    return v


def _figures(stats: dict) -> dict:
    return {k: _value(v) for k, v in stats.items()}


def table_rows(lake: Lake, table: str) -> int:
    """Rows in the whole table, from the Delta log's per-file counts (no data read)."""
    files = pl.DataFrame(pa.table(lake.table(table).get_add_actions(flatten=True)))
    if files.height and files["num_records"].null_count() == 0:
        return int(files["num_records"].sum())
    return lake.scan(table).select(pl.len()).collect().item()


def table_uri(lake: Lake, table: str) -> str:
    uri = lake.table_uri(table)
    return Path(uri).as_uri() if lake.is_local else uri


def failed_gate(key: AssetKey | None, e: ValidationFailed) -> AssetCheckResult:
    """The failed check: each failing expectation with threshold and observed value, every
    expectation's result, and the stage's figures (status counts, top errors with examples)."""
    failing = [r for r in e.report.results if not r.passed]
    table = "\n".join(
        ["| expectation | expected | observed |", "|---|---|---|"]
        + [f"| {r.label} | {r.expected or 'to hold'} | {r.observed} |".replace("\n", " ") for r in failing]
    )
    return AssetCheckResult(
        asset_key=key, check_name=GATE, passed=False, severity=AssetCheckSeverity.ERROR,
        description=(f"shard {e.shard} not published: " + "; ".join(r.line() for r in failing))[:2000],
        metadata={
            "shard": e.shard, "failing expectations": MetadataValue.md(table),
            **e.report.as_metadata(), **_figures(e.stats),
        },
    )


def not_checked(key: AssetKey | None, shard: str, e: LaionAssetsError) -> AssetCheckResult:
    """An expected failure before the gate (missing file, bad config): the gate says why."""
    return AssetCheckResult(
        asset_key=key, check_name=GATE, passed=False, severity=AssetCheckSeverity.ERROR,
        description=f"shard {shard} not checked: {e}", metadata={"shard": shard, "reason": str(e)},
    )


def _gate(context, result: AssetCheckResult, materialization: MaterializeResult | None = None) -> Iterator:
    """The materialization (if any) and the gate's result: yielded with it when the run selected
    the check, else logged as an evaluation of this step (module docstring)."""
    step = context.op_execution_context.get_step_execution_context()
    if result.to_asset_check_evaluation(step).asset_check_key in context.selected_asset_check_keys:
        if materialization is None:
            yield result
        else:
            yield MaterializeResult(asset_key=materialization.asset_key, metadata=materialization.metadata, check_results=[result])
        return
    if materialization is not None:
        yield materialization
    # made after the materialization is stored, so the evaluation names it as its target
    context.log_event(result.to_asset_check_evaluation(step))


def _forget_later_gates(context, failed: set[AssetKey]) -> None:
    """Take back the gates this run planned for the stages after `failed`: those steps will not
    run now, and Dagster would show their planned gates as "Execution failed" for this shard
    once the run fails. Only the planned rows of this run are removed (Dagster's check index,
    through its storage: no public API does this); the evaluations of steps that ran stay."""
    from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable
    from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

    storage = context.instance.event_log_storage
    if context.run.asset_check_selection == frozenset() or not isinstance(storage, SqlEventLogStorage):
        return  # nothing planned, or a storage without that index
    graph = context.job_def.asset_layer.asset_graph
    later, todo = set(), list(failed)
    while todo:
        key = todo.pop()
        for child in (graph.get(key).child_keys if graph.has(key) else set()) - later:
            later.add(child)
            todo.append(child)
    if later:
        table = AssetCheckExecutionsTable
        with storage.index_connection() as conn:
            conn.execute(table.delete().where(
                (table.c.run_id == context.run_id) & (table.c.execution_status == "PLANNED")
                & table.c.asset_key.in_([key.to_string() for key in later])
            ))


def _materialization(context, lake: Lake, key: AssetKey | None, table: str, out: StageOutput, view) -> Iterator:
    shard = context.partition_key
    pictures = {}
    if view is not None:
        try:
            pictures = {k: MetadataValue.md(v) for k, v in view().items()}
        except Exception as e:  # noqa: BLE001 - the data is published; the pictures are a view of it
            context.log.warning(f"shard {shard}: pictures of {table} not rendered: {type(e).__name__}: {e}")
    materialization = MaterializeResult(
        asset_key=key,
        metadata={
            "dagster/partition_row_count": out.rows,
            "dagster/row_count": table_rows(lake, table),
            "dagster/column_schema": table_schema(out.schema, table),
            "dagster/uri": table_uri(lake, table),
            "delta_version": out.version,
            **_figures(out.stats),
            **({"preview": MetadataValue.md(markdown_table(out.preview))} if out.preview is not None else {}),
            **pictures,
        },
    )
    passed = AssetCheckResult(asset_key=key, check_name=GATE, passed=True, metadata={"shard": shard, **out.report.as_metadata()})
    yield from _gate(context, passed, materialization)


def run_stage(
    context, lake: Lake, table: str, fn: Callable[[], StageOutput],
    view: Callable[[], dict[str, str]] | None = None,
) -> Iterator:
    """Yield the MaterializeResult of one stage run with its gate's result, or fail the step.

    `view` renders the shard's pictures (markdown) once it is published; a picture that cannot
    be drawn is logged, never fails a published shard."""
    if view is not None:
        pictures.preload()
    try:
        out = fn()
    except ValidationFailed as e:
        yield from _gate(context, failed_gate(None, e))
        _forget_later_gates(context, set(context.selected_asset_keys))
        raise ShardFailed(str(e), {"failing expectations": "\n".join(e.failures)}) from None
    except LaionAssetsError as e:
        yield from _gate(context, not_checked(None, context.partition_key, e))
        _forget_later_gates(context, set(context.selected_asset_keys))
        raise ShardFailed(str(e), kind=type(e).__name__) from None
    yield from _materialization(context, lake, None, table, out, view)


def run_stages(
    context, lake: Lake, tables: dict[AssetKey, str], fn: Callable[[], dict],
    views: dict[AssetKey, Callable[[], dict[str, str]]] | None = None,
) -> Iterator:
    """For a step that publishes several assets (one per embedding space): materialize each
    asset that passed its gate, a failed check for each that did not, then fail the step if
    any did not."""
    if views:
        pictures.preload()
    try:
        outs = fn()
    except LaionAssetsError as e:
        for key in tables:
            yield from _gate(context, not_checked(key, context.partition_key, e))
        _forget_later_gates(context, set(tables))
        raise ShardFailed(str(e), kind=type(e).__name__) from None
    failed = []
    for key, out in outs.items():
        if isinstance(out, ValidationFailed):
            failed.append(out)
            yield from _gate(context, failed_gate(key, out))
        else:
            yield from _materialization(context, lake, key, tables[key], out, (views or {}).get(key))
    if failed:
        _forget_later_gates(context, {key for key, out in outs.items() if isinstance(out, ValidationFailed)})
        raise ShardFailed(
            "; ".join(str(e) for e in failed)[:2000], {"failing expectations": "\n".join(f for e in failed for f in e.failures)},
        )
