"""lake_summary: the lake across shards, for a curator's first look (refreshed daily; materialize
it from the UI any time)."""


import time
from collections.abc import Sequence
from pathlib import Path

from dagster import AssetExecutionContext, AssetsDefinition, MaterializeResult, MetadataValue, asset

from laion_assets.core.stages import lakewide
from laion_assets.core.ui import pictures, summary
from laion_assets.defs.gate import markdown_table
from laion_assets.defs.resources import LakeResource

HISTORY = 200  # earlier summaries read back for the subset sizes over time


def summary_asset(deps: Sequence[AssetsDefinition]) -> AssetsDefinition:
    @asset(name="lake_summary", deps=deps, kinds={"delta", "polars"})
    def lake_summary(context: AssetExecutionContext, lake: LakeResource) -> MaterializeResult:
        """Totals across shards: rows, shards, files and size per table; images by status; success
        rate of the most frequent domains; subset sizes over time (one point per summary)."""
        lk = lake.lake()
        s = lakewide.tracked(lk, None, lakewide.SUMMARY, lambda: summary.summarize(lk))
        subsets = {t: r for t, r in zip(s.tables["table"], s.tables["rows"]) if t.startswith("subsets/")}
        history: dict[str, list[tuple[float, float]]] = {name: [] for name in subsets}
        for record in context.instance.fetch_materializations(context.asset_key, limit=HISTORY).records:
            before = record.asset_materialization.metadata.get("subset_rows")
            for name, rows in (before.data if before is not None else {}).items():
                history.setdefault(name, []).append((record.timestamp, rows))
        for name, rows in subsets.items():
            history[name].append((time.time(), rows))
        images = s.rows("images")
        success = s.statuses.filter(s.statuses["status"] == "success")["rows"].sum() if images else 0
        metadata = {
            "dagster/row_count": images,
            "dagster/uri": Path(lk.uri).as_uri() if lk.is_local else lk.uri,
            "success_rate": round(success / max(1, images), 3),
            "tables": MetadataValue.md(markdown_table(s.tables)),
            "images_by_status": MetadataValue.md(markdown_table(s.statuses)),
            "top_domains": MetadataValue.md(markdown_table(s.domains)),
            "subset_rows": MetadataValue.json(subsets),
            **{f"rows/{t}": int(r) for t, r in zip(s.tables["table"], s.tables["rows"])},
        }
        if any(history.values()):
            chart = pictures.lines(history, "subset sizes over time", "rows")
            metadata["subset_sizes"] = MetadataValue.md(pictures.markdown_image("subset sizes over time", chart))
        return MaterializeResult(metadata=metadata)

    return lake_summary
