"""The Dagster layer: partitions, resources, one module per stage (assets + checks), sensors,
schedules; definitions.py builds the Definitions from them."""
