"""The shard registry: which input file each shard key came from, kept in the lake.

The sensor and `laion-assets run` register files; the raw_urls stage looks its shard up here,
so a shard materialized from the UI reads the same file as the run that registered it.
"""

from __future__ import annotations

from datetime import datetime, timezone

import polars as pl

from laion_assets.core.errors import LaionAssetsError
from laion_assets.core.ingest import shard_key
from laion_assets.core.lake import Lake

TABLE = "_shards"


def registered(lake: Lake) -> dict[str, str]:
    """All registered shards: key -> source file URI."""
    if not lake.exists(TABLE):
        return {}
    df = lake.scan(TABLE).select("shard", "source").collect()
    return dict(zip(df["shard"].to_list(), df["source"].to_list()))


def register(lake: Lake, sources: list[str]) -> dict[str, str]:
    """Register files as shards; returns the keys that are new. Same file twice: nothing new."""
    known = registered(lake)
    new: dict[str, str] = {}
    for source in sources:
        key = shard_key(source)
        owner = known.get(key) or new.get(key)
        if owner is None:
            new[key] = source
        elif owner != source:
            raise LaionAssetsError(
                f"shard key '{key}' is already registered for {owner}; rename {source} so its "
                "file name (without extensions) is unique"
            )
    if new:
        now = datetime.now(timezone.utc)
        lake.append(
            TABLE,
            pl.DataFrame({"shard": list(new), "source": list(new.values())}).with_columns(
                registered_at=pl.lit(now)
            ),
        )
    return new


def source_of(lake: Lake, shard: str) -> str:
    source = registered(lake).get(shard)
    if source is None:
        raise LaionAssetsError(
            f"shard '{shard}' is not registered in lake {lake.uri}: drop its file in the input "
            "folder (the sensor registers it) or run `laion-assets run <file>`"
        )
    return source
