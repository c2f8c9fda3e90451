"""Shard files in, partitions and (for a daemon) a queued backfill out: what `laion-assets run`
and `laion-assets backfill` share.

A backfill is the same kind the UI's "Materialize" button launches: a `dagster-daemon`
(Postgres instance, run queue, a run launcher) turns it into one run per shard, queued, and
drains the queue within the run and pool limits.
"""

from __future__ import annotations

import time

from dagster import AssetKey, DagsterInstance, Definitions

from laion_assets.core.ingest import registry
from laion_assets.core.ingest.reader import SUPPORTED, check_shard_file, scan_inputs, shard_key
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.lake.store import require_credentials
from laion_assets.defs.keys import lake_paths
from laion_assets.defs.partitions import shards


def select_assets(all_keys: set[AssetKey], select: str | None, paths: dict[AssetKey, str]) -> set[AssetKey]:
    """The keys of a comma-separated `--select` (all when empty); an item is a key, a lake path
    (`paths`: `embeddings/b32` is `embeddings_b32`) or a prefix of either: `embeddings` is every
    embeddings/<space>, `subsets` every subset."""
    if not select:
        return set(all_keys)
    chosen, missing = set(), []
    for item in (s.strip() for s in select.split(",") if s.strip()):
        path = item.split("/")
        hits = {k for k in all_keys if path in (k.path[: len(path)], paths[k].split("/")[: len(path)])}
        chosen |= hits
        missing += [] if hits else [item]
    if missing:
        known = ", ".join(sorted(k.to_user_string() for k in all_keys))
        raise LaionAssetsError(f"unknown asset(s) {', '.join(missing)}; known: {known}")
    return chosen


def register_shards(lake: Lake, inputs: list[str], instance: DagsterInstance) -> list[str]:
    """Check and register every shard file of `inputs` in the lake and as a partition (files
    skipped in a folder are printed); returns the keys in input order, new and known. A file
    that cannot be a shard raises LaionAssetsError before anything is registered."""
    scans = [scan_inputs(location) for location in inputs]
    for path, why in (skip for scan in scans for skip in scan.skipped):
        print(f"skipped {path}: {why}", flush=True)
    files = [f for scan in scans for f in scan.files]
    if not files:
        raise LaionAssetsError(f"no shard files ({SUPPORTED}) in {', '.join(inputs)}")
    for f in files:
        check_shard_file(f)
    registry.register(lake, files)
    keys = list(dict.fromkeys(shard_key(f) for f in files))
    add_partitions(instance, keys)
    return keys


def add_partitions(instance: DagsterInstance, keys: list[str], tries: int = 5) -> None:
    """Add the shard partitions not there yet. Idempotent under races: a key that another
    process (the sensor, another CLI) adds between our diff and our insert fails the insert
    (UNIQUE), and the diff is taken again."""
    from sqlalchemy.exc import IntegrityError

    for attempt in range(tries):
        known = set(instance.get_dynamic_partitions(shards.name))
        new = [k for k in keys if k not in known]
        if not new:
            return
        try:
            instance.add_dynamic_partitions(shards.name, new)
            return
        except IntegrityError:
            if attempt == tries - 1:
                raise


def register_adopted(lake: Lake, location: str, prefix: str | None, instance: DagsterInstance) -> list[str]:
    """Register the finished shards of an img2dataset folder in the lake, as adopted (their
    raw_urls and images are read from the folder, never fetched), and as partitions."""
    from laion_assets.core.ingest.img2dataset import register_folder

    keys, skipped = register_folder(lake, location, prefix)
    for path, why in skipped:
        print(f"skipped {path}: {why}", flush=True)
    add_partitions(instance, keys)
    return keys


def ensure_pools(defs: Definitions, instance: DagsterInstance) -> None:
    """Give every pool of the assets its row (at the instance's default limit) before runs
    start: on Postgres, runs that create a pool's row at the same moment crash
    (dagster#33552). Limits already set are kept."""
    from sqlalchemy.exc import DBAPIError

    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits or instance.global_op_concurrency_default_limit is None:
        return
    graph = defs.resolve_asset_graph()
    pools = {pool for key in graph.get_all_asset_keys() for pool in graph.get(key).pools or ()}
    for pool in sorted(pools - storage.get_concurrency_keys()):
        try:
            storage.initialize_concurrency_limit_to_default(pool)
        except DBAPIError:  # another process created it first: same outcome
            pass


def launch_backfill(
    defs: Definitions, instance: DagsterInstance, keys: list[str], assets: list[AssetKey], title: str | None = None
) -> str:
    """Queue a backfill of `assets` (shard assets) for the shards `keys`; the daemon runs it.
    Returns its id."""
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=make_new_backfill_id(),
        asset_graph=defs.resolve_asset_graph(),
        partition_names=keys,
        asset_selection=assets,
        backfill_timestamp=time.time(),
        tags={"laion_assets/launched_by": "laion-assets backfill"},
        dynamic_partitions_store=instance,
        all_partitions=False,
        title=title or f"{len(keys)} shards",
        description=None,
        run_config=None,
    )
    instance.add_backfill(backfill)
    return backfill.backfill_id


def backfill_shards(inputs: list[str], lake: str, config: str | None, select: str | None, instance: DagsterInstance):
    """`laion-assets backfill`: register the shard files and queue one backfill of the selected
    shard stages (all by default). Returns the backfill id and the shard keys."""
    from laion_assets.defs.definitions import SHARD_JOB, build_defs
    from laion_assets.defs.resources import Settings

    defs = build_defs(Settings(lake=lake, inputs=inputs[0], config=config))
    graph, shard_keys = defs.resolve_asset_graph(), set(defs.resolve_job_def(SHARD_JOB).asset_layer.executable_asset_keys)
    chosen = select_assets(shard_keys, select, lake_paths(graph))
    for uri in (lake, *inputs):
        require_credentials(uri)
    lk = Lake(lake)
    lk.ensure_writable()
    keys = register_shards(lk, inputs, instance)
    ensure_pools(defs, instance)
    order = [k for k in graph.toposorted_asset_keys if k in chosen]
    return launch_backfill(defs, instance, keys, order), keys
