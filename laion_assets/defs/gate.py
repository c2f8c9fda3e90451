"""Write-audit-publish in Dagster terms: run a core stage, turn its report into a blocking
check result and its numbers into materialization metadata; a failed gate fails the step
with the failing expectations, and nothing is materialized."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

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

from laion_assets.core.errors import LaionAssetsError, ValidationFailed
from laion_assets.core.lake import Lake
from laion_assets.core.stages import StageOutput

GATE = "quality_gate"


def gate_spec(key: str | AssetKey) -> AssetCheckSpec:
    return AssetCheckSpec(
        GATE, asset=key, blocking=True,
        description="great-expectations suite run on the shard before it is published",
    )


def table_schema(schema: pa.Schema) -> TableSchema:
    return TableSchema(columns=[TableColumn(f.name, str(f.type)) for f in schema])


def markdown_table(df) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for row in df.iter_rows():
        lines.append("| " + " | ".join("" if v is None else str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def _value(v):
    if isinstance(v, dict):
        return MetadataValue.json(json.loads(json.dumps(v, default=str)))
    if v is None:
        return MetadataValue.text("")
    return v


def _materialization(lake: Lake, key: AssetKey | None, table: str, out: StageOutput) -> MaterializeResult:
    return MaterializeResult(
        asset_key=key,
        metadata={
            "dagster/row_count": out.rows,
            "dagster/column_schema": table_schema(out.schema),
            "dagster/uri": lake.table_uri(table),
            "delta_version": out.version,
            **{k: _value(v) for k, v in out.stats.items()},
            **({"preview": MetadataValue.md(markdown_table(out.preview))} if out.preview is not None else {}),
        },
        check_results=[
            AssetCheckResult(asset_key=key, check_name=GATE, passed=True, metadata=out.report.as_metadata())
        ],
    )


def _failed_gate(key: AssetKey | None, e: ValidationFailed) -> AssetCheckResult:
    return AssetCheckResult(
        asset_key=key, check_name=GATE, passed=False, severity=AssetCheckSeverity.ERROR,
        metadata={**e.report.as_metadata(), "shard": e.shard}, description=str(e)[:2000],
    )


def run_stage(context, lake: Lake, table: str, fn: Callable[[], StageOutput]) -> Iterator:
    """Yield the check result and MaterializeResult of one stage run, or fail the step."""
    try:
        out = fn()
    except ValidationFailed as e:
        yield _failed_gate(None, e)
        raise Failure(description=str(e), metadata={"failing expectations": "\n".join(e.failures)}, allow_retries=False) from None
    except LaionAssetsError as e:
        raise Failure(description=str(e), allow_retries=False) from None
    yield _materialization(lake, None, table, out)


def run_stages(context, lake: Lake, tables: dict[AssetKey, str], fn: Callable[[], dict]) -> Iterator:
    """For a step that publishes several assets (one per embedding space): materialize each
    asset that passed its gate, a failed check for each that did not, then fail the step if
    any did not."""
    try:
        outs = fn()
    except LaionAssetsError as e:
        raise Failure(description=str(e), allow_retries=False) from None
    failed = []
    for key, out in outs.items():
        if isinstance(out, ValidationFailed):
            failed.append(out)
            yield _failed_gate(key, out)
        else:
            yield _materialization(lake, key, tables[key], out)
    if failed:
        raise Failure(
            description="; ".join(str(e) for e in failed)[:2000],
            metadata={"failing expectations": "\n".join(f for e in failed for f in e.failures)}, allow_retries=False,
        )
