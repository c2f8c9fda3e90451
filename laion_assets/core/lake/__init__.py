"""The storage every stage shares and that knows no stage: Delta tables partitioned by shard, plain files beside them, table names, quality suites, errors."""
