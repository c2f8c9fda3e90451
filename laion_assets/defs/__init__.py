"""The Dagster layer: partitions, resources, one module per stage (assets + checks), sensors,
schedules; definitions.py builds the Definitions from them."""

import warnings

from dagster import BetaWarning, PreviewWarning

# Beta and preview features chosen knowingly (one shard per backfill run, one check result per
# shard, links to the source code): said once here instead of one warning per asset at start.
warnings.filterwarnings("ignore", r"Parameter `backfill_policy` of function `asset`", BetaWarning)
warnings.filterwarnings("ignore", r"Specifying a partitions_def on an AssetCheckSpec", PreviewWarning)
warnings.filterwarnings("ignore", r"(Class|Function) `(LocalFileCodeReference|CodeReferencesMetadataValue|with_source_code_references)`", BetaWarning)
