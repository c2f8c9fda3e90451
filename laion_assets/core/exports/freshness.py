"""Whether a subset's webdataset export and kNN index still show the subset as it is now.

Each export shard records what it was made from (its record: the subset's Delta version and
`subset_files`, the names of the subset shard's data files, which every change of the shard
renews: a republish, a curation pass taking rows out); the index records a fingerprint per
shard in its manifest. An export or index made from other files than the subset holds now is
stale: `train-args` and search refuse it, naming the command that brings it up to date, rather
than hand a trainer rows a blocklist took out.
"""

from __future__ import annotations

import shlex

from laion_assets.core.exports.knn import MANIFEST, index_folder
from laion_assets.core.exports.webdataset import export_record, exported_shards
from laion_assets.core.ingest import registry
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.lake.files import LakeFiles, shard_fingerprint
from laion_assets.core.lake.tables import embeddings_table, subset_table


def subset_shards(lake: Lake, subset: str) -> list[str]:
    table = subset_table(subset)
    return sorted({p["shard"] for p in lake.table(table).partitions()}) if lake.exists(table) else []


def subset_files(lake: Lake, subset: str, shard: str) -> str:
    """Names the subset shard's data as it is now (what an export shard records)."""
    return shard_fingerprint(lake, [subset_table(subset)], shard)


def stale_exports(lake: Lake, subset: str) -> list[str]:
    """Shards whose tars do not hold the subset shard as it is now: never exported, or made
    from other files of it (a shard the subset no longer has has none)."""
    shards = subset_shards(lake, subset)
    stale = []
    for shard in sorted(set(shards) | exported_shards(lake, subset)):
        record = export_record(lake, subset, shard)
        if record is None or record.get("subset_files") != subset_files(lake, subset, shard):
            stale.append(shard)
    return stale


def stale_index(lake: Lake, subset: str) -> list[str]:
    """Shards the subset's kNN index holds other rows of than the subset does now (or lacks,
    or holds though the subset no longer has them)."""
    manifest = LakeFiles(lake, index_folder(subset)).read_json(MANIFEST)
    if manifest is None:
        return []
    emb = embeddings_table(manifest["space"])
    indexed = manifest["shards"]
    shards = subset_shards(lake, subset)
    return sorted(
        s for s in set(shards) | set(indexed)
        if s not in indexed or indexed[s]["fingerprint"] != shard_fingerprint(lake, [subset_table(subset), emb], s)
    )


def fix_command(lake: Lake, shards: list[str], asset: str) -> str:
    """The `laion-assets run` that brings `asset` up to date for `shards` (their registered files)."""
    sources = registry.registered(lake)
    files = sorted({sources[s] for s in shards if s in sources}) or ["<the shard files>"]
    return f"laion-assets run {' '.join(shlex.quote(f) for f in files)} --lake {shlex.quote(lake.uri)} --select {asset}"


def _refuse_stale(lake: Lake, stale: list[str], what: str, risk: str, asset: str) -> None:
    if stale:
        raise LaionAssetsError(
            f"{what} is older than the subset in {len(stale)} shard(s) "
            f"({', '.join(stale[:5])}{'...' if len(stale) > 5 else ''}): {risk}; "
            f"bring it up to date with: {fix_command(lake, stale, asset)}"
        )


def refuse_stale_export(lake: Lake, subset: str) -> None:
    """LaionAssetsError when the subset's tars lag the subset (train-args must not name them)."""
    _refuse_stale(lake, stale_exports(lake, subset), f"the webdataset export of subset '{subset}'",
                  "its tars may hold rows the subset no longer has", f"webdataset_{subset}")


def refuse_stale_index(lake: Lake, subset: str) -> None:
    """LaionAssetsError when the subset's kNN index lags the subset (search must not show it)."""
    _refuse_stale(lake, stale_index(lake, subset), f"the kNN index of subset '{subset}'",
                  "it may return rows the subset no longer has", f"knn_{subset}")
