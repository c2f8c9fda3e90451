"""What the Dagster UI shows: pictures, per-shard views, the lake summary, column descriptions."""
