"""Shards are the partitions of every stage asset and of their checks: one dynamic key per
input file."""

from dagster import BackfillPolicy, DynamicPartitionsDefinition, asset

from laion_assets.defs.executors import POOL_OP_TAGS

shards = DynamicPartitionsDefinition(name="shards")

# Every stage asset: partitioned by shard, one shard per run in backfills (scale-out is many
# runs through Dagster's run queue and launchers).
shard_backfill = BackfillPolicy.multi_run(1)


def pool_op_tags(pool: str | None, op_tags: dict | None = None) -> dict:
    """A step's op tags with its pool's (a `gpu` step asks Kubernetes for a GPU)."""
    return {**POOL_OP_TAGS.get(pool, {}), **(op_tags or {})}


def shard_asset(**kwargs):
    """A stage asset of one shard; a step in a pool carries that pool's op tags."""
    if kwargs.get("pool") in POOL_OP_TAGS:
        kwargs["op_tags"] = pool_op_tags(kwargs["pool"], kwargs.get("op_tags"))
    return asset(partitions_def=shards, backfill_policy=shard_backfill, **kwargs)
