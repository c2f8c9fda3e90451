"""The lake-wide curation stages: the per-shard key index, the duplicates and blocklist passes
(which also bring the published subsets, and their webdataset tars and kNN indexes, up to
date), and semantic dedup per subset."""

from __future__ import annotations

import polars as pl

from laion_assets.core.config import PipelineConfig
from laion_assets.core.curation import blocklists, dedup, passes, semdedup
from laion_assets.core.curation.config import SemanticDedupConfig
from laion_assets.core.exports.knn import MANIFEST, index_folder, sync_index
from laion_assets.core.exports.webdataset import export_shard, exported_shards
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.lake.files import LakeFiles
from laion_assets.core.lake.tables import IMAGES, SCORES, embeddings_table, subset_table
from laion_assets.core.stages import fingerprints
from laion_assets.core.stages.publish import StageOutput
from laion_assets.core.stages.subsets import run_subset
from laion_assets.core.subsets.rules import SubsetConfig


def run_dedup_keys(lake: Lake, cfg: PipelineConfig, shard: str) -> dict:
    """The shard's keys, recorded with its fingerprint so an up-to-date shard is skipped."""
    fingerprint = fingerprints.current(lake, cfg, dedup.INDEX, shard)
    report = dedup.update_index(lake, shard, cfg.curation.dedup)
    fingerprints.record(lake, dedup.INDEX, shard, fingerprint, report["index_version"])
    return report


def _up_to_date_after(lake: Lake, cfg: PipelineConfig, changed: pl.DataFrame, subsets: dict) -> None:
    """Subset shards whose marks a pass changed (and took out of the subset): up to date again."""
    shards = sorted(changed["shard"].unique().to_list()) if changed.height else []
    for sub in cfg.subsets:
        n = fingerprints.after_pass(lake, cfg, subset_table(sub.name), shards)
        if n and sub.name in subsets:
            subsets[sub.name]["shards_up_to_date"] = n


def _exports_follow(lake: Lake, cfg: PipelineConfig, subsets: dict) -> None:
    """Bring the webdataset tars and the kNN index of every subset a pass changed up to date,
    before the pass reports success: a trainer or a search must never see a row the pass took
    out. Only what exists is brought up to date (an export or index not made yet is made
    from the subset as it is when its own stage runs); a failure fails the pass."""
    exported = {s.name for s in cfg.exported_subsets()}
    indexed = {s.name for s in cfg.indexed_subsets()}
    for name, change in subsets.items():
        shards = sorted({*change.get("per_shard", {}), *change.get("shards_rerun", [])})
        if name in exported:
            have = exported_shards(lake, name)
            written = [s for s in shards if s in have and export_shard(lake, cfg, name, s).rewritten]
            change["webdataset_shards_rewritten"] = written
        if name in indexed and LakeFiles(lake, index_folder(name)).exists(MANIFEST):
            change["knn_version"] = sync_index(lake, cfg, name).version


def run_curated_subset(lake: Lake, cfg: PipelineConfig, sub: SubsetConfig, shard: str, tries: int = 5) -> StageOutput:
    """The subset stage, published again when a pass committed new marks while it ran: a pass
    takes newly marked rows out of the subsets only after committing them, so a shard read
    before that commit and published after the pass's delete would keep them otherwise."""
    for _ in range(tries):
        before = passes.marks_versions(lake)
        out = run_subset(lake, cfg, sub, shard)
        if passes.marks_versions(lake) == before:
            return out
    raise LaionAssetsError(f"subset {sub.name}, shard {shard}: the curation marks kept changing while it ran; run it again")


def _rerun(lake: Lake, cfg: PipelineConfig):
    """Publish a subset shard again (rows came back); shards the pipeline has not reached yet
    get their subset when it does."""
    def rerun(sub, shard: str) -> None:
        if lake.exists(SCORES) and lake.shard_row_count(SCORES, shard):
            run_curated_subset(lake, cfg, sub, shard)
    return rerun


def run_duplicates(lake: Lake, cfg: PipelineConfig) -> dict:
    """Mark duplicates lake-wide, then drop new ones from the subsets whose recipe excludes their kind."""
    result = dedup.run_pass(lake, cfg.curation.dedup)
    subsets = passes.apply_to_subsets(
        lake, cfg.subsets, subset_table, result.newly_marked, result.unmarked,
        lambda sub: pl.col("kind").is_in(list(sub.exclude_duplicates)) if sub.exclude_duplicates else None,
        _rerun(lake, cfg), reason=f"duplicates pass (index v{result.index_version})",
    )
    _up_to_date_after(lake, cfg, pl.concat([result.newly_marked.select("shard"), result.unmarked.select("shard")]), subsets)
    _exports_follow(lake, cfg, subsets)
    per_shard, totals = dedup.lake_figures(lake)
    new_per_kind = dict(result.newly_marked.group_by("kind").len().sort("kind").iter_rows())
    return {
        "mode": result.mode, "index_version": result.index_version, "marks_version": result.marks_version,
        "shards_changed": result.shards_changed, "index_entries_read": result.rows_checked,
        "newly_marked": new_per_kind, "unmarked": result.unmarked.height,
        "duplicates_total": totals, "duplicates_per_shard": per_shard, "subsets_updated": subsets,
    }


def run_blocklists(lake: Lake, cfg: PipelineConfig) -> dict:
    """Mark blocked rows lake-wide, publish the diff, and take newly blocked rows out of every subset."""
    result = blocklists.run_pass(lake, cfg.curation.blocklists.location)
    diff = result.diff
    removed = diff.filter(pl.col("change") == "removed") if diff.height else pl.DataFrame(schema={"shard": pl.String, "uid": pl.Int64})
    restored = diff.filter(pl.col("change") == "restored") if diff.height else removed.clear()
    restored = restored.join(result.blocked, on=["shard", "uid"], how="anti")  # still blocked by another list
    subsets = passes.apply_to_subsets(
        lake, cfg.subsets, subset_table, removed, restored, lambda sub: pl.lit(True),
        _rerun(lake, cfg), reason=f"blocklist pass {result.version}",
    )
    _up_to_date_after(lake, cfg, diff.select("shard") if diff.height else diff, subsets)
    _exports_follow(lake, cfg, subsets)
    blocked = result.blocked
    unknown = 0
    if lake.exists(IMAGES):  # rows published before md5/sha1 were recorded cannot match those lists
        has = "md5" in passes.table_columns(lake, IMAGES)
        stored = lake.scan(IMAGES).filter(pl.col("status") == "success")
        unknown = (stored.filter(pl.col("md5").is_null()) if has else stored).select(pl.len()).collect().item()
    per_shard = blocked.group_by("shard").agg(pl.len().alias("rows_blocked")).sort("shard") if blocked.height else pl.DataFrame()
    return {
        "mode": result.mode, "blocked_version": result.version,
        "lists": {bl.name: {"kind": bl.kind, "source": bl.source, "entries": len(bl.entries), "fingerprint": bl.fingerprint} for bl in result.lists},
        "rows_blocked_total": blocked.select(["shard", "uid"]).unique().height,
        "rows_blocked_per_list": dict(blocked.group_by("list").len().sort("list").iter_rows()),
        "blocked_per_shard": per_shard,
        "diff_rows": {c: int((diff["change"] == c).sum()) if diff.height else 0 for c in ("removed", "restored")},
        "diff_files": result.diff_files, "shards_checked": result.shards_checked, "subsets_updated": subsets,
        "stored_rows_without_md5_sha1": unknown,  # re-materialize images for their shards to check them
    }


def run_semdedup(lake: Lake, cfg: PipelineConfig, sem: SemanticDedupConfig) -> dict:
    """SemDeDup over a published subset; its marks replace `curation/semdedup/<subset>`."""
    space = cfg.semantic_space(sem)
    table = subset_table(sem.subset)
    stream, rows = semdedup.subset_stream(lake, table, embeddings_table(space)) if lake.exists(table) else (None, 0)
    result = semdedup.semdedup(stream, rows, sem)
    recipe = {**sem.model_dump(), "space": space, "embedding_space": cfg.embeddings.spaces[space].identity,
              "subset_version": lake.table(table).version() if lake.exists(table) else None}
    version = passes.write(
        lake, semdedup.semdedup_table(sem.subset), result.removed.to_arrow().cast(semdedup.MARKS_SCHEMA),
        mode="overwrite", partition_by=["shard"], state=recipe,
    )
    per_shard = result.removed.group_by("shard").len().sort("shard") if result.removed.height else pl.DataFrame()
    return {
        "rows": result.rows, "clusters": result.clusters, "largest_cluster": result.largest_cluster,
        "removed": result.removed.height, "removed_fraction": round(result.removed.height / max(1, result.rows), 4),
        "removed_per_shard": per_shard, "version": version, "recipe": recipe,
    }
