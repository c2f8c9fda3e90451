"""Shards are the partitions of every stage asset and of their checks: one dynamic key per
input file."""

import inspect

from dagster import AssetKey, AssetSpec, BackfillPolicy, DynamicPartitionsDefinition, multi_asset

from laion_assets.defs.executors import POOL_OP_TAGS

shards = DynamicPartitionsDefinition(name="shards")

# Every stage asset: partitioned by shard, one shard per run in backfills (scale-out is many
# runs through Dagster's run queue and launchers).
shard_backfill = BackfillPolicy.multi_run(1)


def pool_op_tags(pool: str | None, op_tags: dict | None = None) -> dict:
    """A step's op tags with its pool's (a `gpu` step asks Kubernetes for a GPU)."""
    return {**POOL_OP_TAGS.get(pool, {}), **(op_tags or {})}


def shard_asset(*, key=None, name: str | None = None, deps=(), kinds=None, description: str | None = None,
                group_name: str | None = None, metadata: dict | None = None, check_specs=(), pool: str | None = None,
                op_tags: dict | None = None):
    """A stage asset of one shard (named after the function, or `name`, or `key`); a step in a
    pool carries that pool's op tags. Its gate can be left out of a run's selection (the asset
    is subsettable), so runs need not plan a check whose step may never run (defs/gate.py)."""

    def wrap(fn):
        asset_key = AssetKey.from_coercible(key) if key is not None else AssetKey(name or fn.__name__)
        spec = AssetSpec(
            asset_key, deps=deps, kinds=kinds, group_name=group_name, metadata=metadata, description=description or inspect.getdoc(fn),
        )
        return multi_asset(
            specs=[spec], check_specs=check_specs, can_subset=True, name="__".join(asset_key.path),
            partitions_def=shards, backfill_policy=shard_backfill, pool=pool,
            op_tags=pool_op_tags(pool, op_tags) if pool in POOL_OP_TAGS else op_tags,
        )(fn)

    return wrap
