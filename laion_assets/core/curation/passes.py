"""What the lake-wide passes share: Delta writes with retries, the state a pass leaves in its
commit, which rows a subset must leave out, and taking marked rows out of published subsets.

A pass (duplicates, blocklists) records what it has seen (index version, list fingerprints)
in the custom metadata of its own commit, so the next pass knows what changed since, and the
state is never out of step with the data it describes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import polars as pl
import pyarrow as pa
from deltalake import CommitProperties, write_deltalake

from laion_assets import __version__
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.tables import BLOCKED, DUPLICATES

MARK_COLUMNS = ("duplicate_url", "duplicate_sha256", "duplicate_phash")
STATE_KEY = "curation_state"


def write(lake: Lake, name: str, data: pa.Table, *, mode: str, partition_by: list[str], predicate: str | None = None,
          state: dict | None = None, metadata: dict | None = None, description: str | None = None) -> int:
    """One Delta commit (append, or overwrite of the rows matching `predicate`), retried when
    another writer committed first; `state` goes into the commit. Returns the new version."""
    lake.ensure_writable()
    meta = {"code_version": __version__, **(metadata or {}), **({STATE_KEY: json.dumps(state, sort_keys=True)} if state else {})}

    def commit() -> None:
        if not lake.exists(name):  # created empty first: two first writers then both overwrite
            write_deltalake(
                lake.table_uri(name), data.schema.empty_table(), mode="append", partition_by=partition_by,
                storage_options=lake.storage_options, description=description,
            )
        write_deltalake(
            lake.table_uri(name), data, mode=mode, partition_by=partition_by, predicate=predicate,
            schema_mode="merge", storage_options=lake.storage_options,
            commit_properties=CommitProperties(custom_metadata=meta),
        )

    lake.retry_commit(f"'{name}'", commit)  # another run committed first: again on top of it
    return lake.table(name).version()


def last_state(lake: Lake, name: str) -> dict | None:
    """The state recorded by the latest pass that committed to `name` (maintenance commits
    in between carry none and are skipped)."""
    if not lake.exists(name):
        return None
    for commit in lake.table(name).history(limit=200):
        if STATE_KEY in commit:
            return json.loads(commit[STATE_KEY])
    return None


def marks_versions(lake: Lake) -> tuple[int | None, int | None]:
    """Versions of the tables a subset reads its exclusions from."""
    return tuple(lake.table(t).version() if lake.exists(t) else None for t in (BLOCKED, DUPLICATES))


def table_columns(lake: Lake, name: str) -> set[str]:
    """Columns of a table now (older shards read columns added later as null)."""
    return set(pa.schema(lake.table(name).schema().to_arrow()).names)


def in_list(column: str, values: Iterable) -> str:
    """A SQL `IN` predicate over string values (shard keys are checked to a safe alphabet)."""
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


def with_marks(lake: Lake, shard: str, pool: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """A subset's candidate rows of `shard` without the blocked ones (every subset loses them),
    with a `duplicate_<kind>` flag per duplicate kind for the subset rules; and how many rows
    were blocked."""
    blocked = pl.Series("uid", [], pl.Int64)
    if lake.exists(BLOCKED):
        blocked = lake.scan(BLOCKED).filter(pl.col("shard") == shard).select("uid").collect()["uid"]
    marks = pl.DataFrame(schema={"kind": pl.String, "uid": pl.Int64})
    if lake.exists(DUPLICATES):
        marks = lake.scan(DUPLICATES).filter(pl.col("shard") == shard).select("kind", "uid").collect()
    kept = pool.filter(~pl.col("uid").is_in(blocked.implode()))
    kept = kept.with_columns(
        pl.col("uid").is_in(marks.filter(pl.col("kind") == column.removeprefix("duplicate_"))["uid"].implode()).alias(column)
        for column in MARK_COLUMNS
    )
    return kept, pool.height - kept.height


def remove_from_subset(lake: Lake, table: str, rows: pl.DataFrame, reason: str) -> dict | None:
    """Delete `rows` (shard, uid) from a published subset in one commit: a new Delta version
    (the old one stays readable by time travel until vacuumed). None when none of them is in it."""
    if rows.is_empty() or not lake.exists(table):
        return None
    present = (
        lake.scan(table).filter(pl.col("shard").is_in(rows["shard"].unique().implode()))
        .select("shard", "uid").collect().join(rows.select("shard", "uid").unique(), on=["shard", "uid"])
    )
    if present.is_empty():
        return None
    lake.retry_commit(f"the removal of rows from '{table}'", lambda: lake.table(table).merge(
        present.to_arrow(), predicate="t.shard = s.shard AND t.uid = s.uid", source_alias="s", target_alias="t",
        commit_properties=CommitProperties(custom_metadata={"stage": "curation", "reason": reason}),
    ).when_matched_delete().execute())
    per_shard = dict(present.group_by("shard").len().sort("shard").iter_rows())
    return {"version": lake.table(table).version(), "rows_removed": present.height, "per_shard": per_shard}


def apply_to_subsets(
    lake: Lake, subsets: Iterable, table_of: Callable[[str], str], removed: pl.DataFrame, restored: pl.DataFrame,
    applies: Callable[[object], pl.Expr | None], rerun: Callable[[object, str], object], reason: str,
) -> dict:
    """Take newly marked rows out of every published subset they apply to (one version per
    subset), and re-run the subset for the shards where marked rows came back (a list entry
    withdrawn, a survivor gone). `applies(sub)` filters the rows that concern a subset."""
    report = {}
    for sub in subsets:
        cond = applies(sub)
        if cond is None:
            continue
        table = table_of(sub.name)
        out = remove_from_subset(lake, table, removed.filter(cond), reason) or {}
        back = sorted(restored.filter(cond)["shard"].unique().to_list()) if not restored.is_empty() else []
        for shard in back:
            rerun(sub, shard)
        if back:
            out["shards_rerun"] = back
            out["version"] = lake.table(table).version()
        if out:
            report[sub.name] = out
    return report
