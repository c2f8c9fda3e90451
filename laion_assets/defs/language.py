"""language: the caption language of every row (CLD3, LAION's en / multi / nolang rule)."""

from dagster import AssetExecutionContext

from laion_assets.core import stages
from laion_assets.defs.gate import gate_spec, run_stage
from laion_assets.defs.partitions import shard_asset
from laion_assets.defs.raw_urls import raw_urls
from laion_assets.defs.resources import LakeResource, PipelineResource


@shard_asset(
    deps=[raw_urls],
    check_specs=[gate_spec("language")],
    kinds={"delta", "polars"},
    group_name="laion",
)
def language(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource):
    """One row per input row: `language` (an ISO code where Google's CLD3 is reliable, else
    `nolang`: the rule LAION used to split LAION-5B into 2B-en, 2B-multi and 1B-nolang),
    CLD3's best `language_guess`, its `language_confidence`, the cleaned caption length
    `caption_chars` (LAION's alt-text filter) and the `language_detector`.
    Cheap: it needs only the captions, not the images."""
    lk = lake.lake()
    yield from run_stage(
        context, lk, stages.LANGUAGE, lambda: stages.run_language(lk, pipeline.config(), context.partition_key)
    )
