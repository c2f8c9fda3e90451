"""The shard registry: which input file each shard key came from, kept in the lake.

The sensor and `laion-assets run` register files; the raw_urls stage looks its shard up here,
so a shard materialized from the UI reads the same file as the run that registered it. A file
refused at ingest does not stay registered, and a key whose file was never published can be
taken over by another file (a corrected copy elsewhere).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from laion_assets.core.ingest.reader import shard_key
from laion_assets.core.lake.delta import Lake, check_shard_key
from laion_assets.core.lake.errors import LaionAssetsError

TABLE = "_shards"
ADOPTED = "_adopted"  # <shard>.json: the shard's images were downloaded by img2dataset, not by us
EXPORTS = "webdataset"  # core/export.py: one folder of tars per subset shard
PUBLISHED_IN = "raw_urls"  # a shard with rows there was ingested from its registered file

log = logging.getLogger(__name__)


def registered(lake: Lake) -> dict[str, str]:
    """All registered shards: key -> source file URI."""
    if not lake.exists(TABLE):
        return {}
    df = lake.scan(TABLE).select("shard", "source").collect()
    return dict(zip(df["shard"].to_list(), df["source"].to_list()))


def is_published(lake: Lake, key: str) -> bool:
    """Whether rows of the shard were published (every stage starts from raw_urls)."""
    return lake.exists(PUBLISHED_IN) and lake.shard_row_count(PUBLISHED_IN, check_shard_key(key)) > 0


def _rows(entries: dict[str, str]) -> pl.DataFrame:
    return pl.DataFrame({"shard": list(entries), "source": list(entries.values())}).with_columns(
        registered_at=pl.lit(datetime.now(timezone.utc))
    )


def register(lake: Lake, sources: list[str], keys: list[str] | None = None) -> dict[str, str]:
    """Register files as shards (keyed by file name unless `keys` are given); returns the keys
    that are new (or moved to another file). Same file twice: nothing new. Two files with one
    key: refused, unless the key's file is not among `sources` and was never published (then
    the new file takes the key over)."""
    known = registered(lake)
    given = set(sources)
    new: dict[str, str] = {}
    moved: dict[str, str] = {}
    for i, source in enumerate(sources):
        key = check_shard_key(keys[i]) if keys else shard_key(source)
        owner = new.get(key) or moved.get(key) or known.get(key)
        if owner is None:
            new[key] = source
        elif owner == source:
            continue
        elif key in new or key in moved:
            raise LaionAssetsError(
                f"two files have the shard key '{key}': {owner} and {source}; rename one so that each file name "
                "(without extensions) is unique"
            )
        elif owner in given or is_published(lake, key):
            raise LaionAssetsError(
                f"shard key '{key}' is already registered for {owner}; rename {source} so its "
                "file name (without extensions) is unique"
            )
        else:
            log.warning("shard %s: %s takes over the key from %s, which was never published", key, source, owner)
            moved[key] = source
    if new:
        lake.append(TABLE, _rows(new))
    for key, source in moved.items():
        lake.publish_shard(TABLE, key, _rows({key: source}))
    return {**new, **moved}


def release(lake: Lake, key: str) -> None:
    """Forget a shard's file after ingest refused it, unless rows from it were published."""
    if lake.exists(TABLE) and not is_published(lake, key):
        lake.delete_shard(TABLE, key)


def record_adoption(lake: Lake, shard: str, source: str, found: dict) -> None:
    """Say that a shard's source is a download another tool made (`found`: where its images
    are), so its stages read that instead of fetching (core/images/adopt.py)."""
    lake.put(f"{ADOPTED}/{shard}.json", json.dumps({"source": source, **found}).encode())


def adoption(lake: Lake, shard: str) -> dict | None:
    """The adoption record of a shard, if its registered file is still the one adopted."""
    data = lake.get(f"{ADOPTED}/{check_shard_key(shard)}.json")
    found = json.loads(data) if data else None
    return found if found and registered(lake).get(shard) == found["source"] else None


def source_of(lake: Lake, shard: str) -> str:
    source = registered(lake).get(shard)
    if source is None:
        raise LaionAssetsError(
            f"shard '{shard}' is not registered in lake {lake.uri}: drop its file in the input "
            "folder (the sensor registers it) or run `laion-assets run <file>`"
        )
    return source


def registered_at(lake: Lake) -> dict[str, str]:
    """key -> when it was registered (ISO time): a shard removed and registered again is new."""
    if not lake.exists(TABLE):
        return {}
    df = lake.scan(TABLE).select("shard", pl.col("registered_at").cast(pl.String)).collect()
    return dict(df.iter_rows())


def missing(lake: Lake, location: str, present: list[str]) -> dict[str, str]:
    """Registered shards whose file was in `location` (a folder or prefix) and is gone."""
    folder = location.rstrip("/") if "://" in location else str(Path(location).expanduser().resolve())
    present_set = set(present)
    return {k: s for k, s in registered(lake).items() if s.rsplit("/", 1)[0] == folder and s not in present_set}


def remove_shard(lake: Lake, shard: str) -> dict[str, int]:
    """Delete a shard from every table of the lake (stages, subsets, staging, anything else
    partitioned by shard) and its export folders, then from the registry; returns the rows
    deleted per table and the files per export folder. The data goes first, so an interrupted
    removal is finished by running it again."""
    from laion_assets.core.lake.files import LakeFiles

    predicate = f"shard = '{check_shard_key(shard)}'"
    known = shard in registered(lake)
    deleted = {}
    for table in lake.tables():
        dt = lake.table(table)
        if table == TABLE or "shard" not in dt.schema().to_arrow().names:
            continue
        rows = int(dt.delete(predicate).get("num_deleted_rows") or 0)
        if rows:
            deleted[table] = rows
    for subset in LakeFiles(lake, EXPORTS).folders():  # webdataset/<subset>/<shard>/: tars of the shard
        files = LakeFiles(lake, f"{EXPORTS}/{subset}/{shard}")
        if names := files.names():
            files.fs.delete_dir(files.root)
            deleted[f"{EXPORTS}/{subset}/{shard}"] = len(names)
        # img2dataset's layout numbers tars across shards: the next export of the subset renumbers
        # them; until then it has no sizes.json, so nothing trains on the removed shard's tars
        flat = LakeFiles(lake, f"{EXPORTS}/{subset}")
        if flat.exists(f"_shards/{shard}.json"):
            flat.delete(f"_shards/{shard}.json")
            flat.delete("sizes.json")
            deleted[f"{EXPORTS}/{subset}/_shards/{shard}.json"] = 1
    if not known and not deleted:
        raise LaionAssetsError(f"shard '{shard}' is neither registered nor has rows in lake {lake.uri}: check the key")
    lake.delete_where(TABLE, predicate)  # an adoption record left behind names a source no longer registered
    return deleted
