"""scores: LAION aesthetic and NSFW heads applied to the image embeddings."""

from dagster import AssetExecutionContext

from laion_assets.core import stages
from laion_assets.defs.embeddings import embeddings
from laion_assets.defs.gate import gate_spec, run_stage
from laion_assets.defs.partitions import shard_asset
from laion_assets.defs.resources import LakeResource, PipelineResource


@shard_asset(
    deps=[embeddings],
    check_specs=[gate_spec("scores")],
    kinds={"delta", "numpy"},
    group_name="laion",
)
def scores(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource):
    """`aesthetic` (LAION aesthetic predictor) and `punsafe` (CLIP-based NSFW detector) per
    image, null where no head is configured. A head trained on another embedding space (or
    dimension) is refused with a clear error unless the config allows it."""
    lk = lake.lake()
    yield from run_stage(
        context, lk, stages.SCORES, lambda: stages.run_scores(lk, pipeline.config(), context.partition_key)
    )
