"""Shards are the partitions of every stage asset and of their checks: one dynamic key per
input file."""

from functools import partial

from dagster import BackfillPolicy, DynamicPartitionsDefinition, asset

shards = DynamicPartitionsDefinition(name="shards")

# Every stage asset: partitioned by shard, one shard per run in backfills (scale-out is many
# runs through Dagster's run queue and launchers).
shard_backfill = BackfillPolicy.multi_run(1)
shard_asset = partial(asset, partitions_def=shards, backfill_policy=shard_backfill)
