"""Asset keys, and where in the lake each asset lives.

The UI labels a lineage node with the last part of its key, so that part says what the node
is: `embeddings_b32`, `webdataset_laion2b_en`, `knn_laion2b_en`, `curation/semdedup_laion2b_en`
(a subset is `subsets/laion2b_en`; its export and index are not labelled `laion2b_en` too).
Keys and lake paths differ for those (the table stays `embeddings/b32`): each asset carries
its path as metadata (`LAKE_PATH`), and `lake_paths` reads them back.
"""

from __future__ import annotations

from dagster import AssetKey

LAKE_PATH = "lake_path"  # asset metadata: the Delta table (or export folder) under the lake root


WATERMARK = AssetKey("watermark")


def embeddings_key(space: str) -> AssetKey:
    return AssetKey(f"embeddings_{space}")


def subset_key(name: str) -> AssetKey:
    return AssetKey(["subsets", name])


def webdataset_key(subset: str) -> AssetKey:
    return AssetKey(f"webdataset_{subset}")


def knn_key(subset: str) -> AssetKey:
    return AssetKey(f"knn_{subset}")


def semdedup_key(subset: str) -> AssetKey:
    return AssetKey(["curation", f"semdedup_{subset}"])


def lake_path(path: str) -> dict[str, str]:
    """The metadata naming an asset's table or folder in the lake."""
    return {LAKE_PATH: path}


def lake_paths(graph) -> dict[AssetKey, str]:
    """Every asset's lake path (its key, joined by '/', where it names none)."""
    return {key: graph.get(key).metadata.get(LAKE_PATH, key.to_user_string()) for key in graph.get_all_asset_keys()}
