"""The lake at a glance, across shards: rows and shards per table, images by status, success
rate by domain, subset sizes. Counts come from the Delta logs; statuses and domains from two
columns of the images table, read as a stream."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from laion_assets.core.lake.delta import Lake

HOST = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/:?#]+)"


@dataclass
class LakeSummary:
    tables: pl.DataFrame  # table, shards, rows, files, MiB
    statuses: pl.DataFrame  # status, rows, share
    domains: pl.DataFrame  # domain, rows, success_rate

    def rows(self, table: str) -> int:
        match = self.tables.filter(pl.col("table") == table)
        return int(match["rows"][0]) if match.height else 0


def table_files(lake: Lake, table: str) -> pl.DataFrame:
    """One row per data file of the table's current version: shard, rows, bytes (log only).
    Lake-wide tables (the curation key index is partitioned by key bucket) have no shard."""
    files = pl.DataFrame(pa.table(lake.table(table).get_add_actions(flatten=True)))
    shard = pl.col("partition.shard") if "partition.shard" in files.columns else pl.lit(None, pl.String)
    return files.select(shard=shard, rows=pl.col("num_records"), bytes=pl.col("size_bytes"))


def summarize(lake: Lake, top_domains: int = 15) -> LakeSummary:
    rows = []
    for table in lake.tables():
        if table.startswith("_"):
            continue
        files = table_files(lake, table)
        rows.append({
            "table": table, "shards": files["shard"].drop_nulls().n_unique(), "rows": int(files["rows"].sum()),
            "files": files.height, "MiB": round(files["bytes"].sum() / 2**20, 1),
        })
    tables = pl.DataFrame(rows, schema={"table": pl.String, "shards": pl.Int64, "rows": pl.Int64, "files": pl.Int64, "MiB": pl.Float64})
    statuses = pl.DataFrame(schema={"status": pl.String, "rows": pl.UInt32, "share": pl.Float64})
    domains = pl.DataFrame(schema={"domain": pl.String, "rows": pl.UInt32, "success_rate": pl.Float64})
    if lake.exists("images"):
        images = lake.scan("images").select("status", domain=pl.col("url").str.extract(HOST, 1).str.to_lowercase())
        statuses = (
            images.group_by("status").agg(rows=pl.len()).with_columns(share=(pl.col("rows") / pl.col("rows").sum()).round(4))
            .sort("rows", "status", descending=[True, False]).collect(engine="streaming")
        )
        domains = (
            images.group_by("domain").agg(rows=pl.len(), success_rate=(pl.col("status") == "success").mean().round(4))
            .sort("rows", "domain", descending=[True, False]).head(top_domains).collect(engine="streaming")
        )
    return LakeSummary(tables, statuses, domains)
