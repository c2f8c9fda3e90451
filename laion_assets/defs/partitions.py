"""Shards are the partitions of every stage asset: one dynamic key per input file."""

from dagster import DynamicPartitionsDefinition

shards = DynamicPartitionsDefinition(name="shards")
