"""raw_urls: one input shard file read, normalised and given LAION uids."""

from dagster import AssetExecutionContext

from laion_assets.core import stages
from laion_assets.defs.gate import gate_spec, run_stage
from laion_assets.defs.partitions import shard_asset
from laion_assets.defs.resources import LakeResource, PipelineResource


@shard_asset(
    check_specs=[gate_spec("raw_urls")],
    kinds={"delta", "polars"},
)
def raw_urls(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource):
    """Input rows of one shard: `uid` (LAION's mmh3.hash64(url+text)[0]), `url`, `caption`,
    `source_row`, `fetch_url` (WHATWG form) and every source column. Rows without a fetchable
    http(s) URL, and repeats, are kept out into `raw_urls_rejected` with their reason. An adopted
    img2dataset shard is read from its status parquet, img2dataset's columns as `img2dataset_*`."""
    lk = lake.lake()
    yield from run_stage(
        context, lk, stages.RAW_URLS,
        lambda: stages.run_raw_urls(lk, pipeline.config(), context.partition_key),
    )
