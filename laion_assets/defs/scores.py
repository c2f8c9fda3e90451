"""scores: the LAION heads (aesthetic, NSFW, ...), each applied to its own space's embeddings."""

from dagster import AssetExecutionContext, AssetsDefinition

from laion_assets.core import stages
from laion_assets.core.config import PipelineConfig
from laion_assets.core.ui import views
from laion_assets.defs.gate import gate_spec, run_stage
from laion_assets.defs.images import images
from laion_assets.defs.keys import embeddings_key
from laion_assets.defs.partitions import shard_asset
from laion_assets.defs.resources import LakeResource, PipelineResource


def scores_asset(cfg: PipelineConfig) -> AssetsDefinition:
    """Depends on the embeddings of exactly the spaces its heads read, so lineage shows which
    space feeds which score."""
    fed = sorted({cfg.head_space(name) for name in cfg.scores.heads})
    heads = ", ".join(f"`{name}` on {cfg.head_space(name)}" for name in cfg.scores.heads) or "none configured"

    @shard_asset(
        name="scores",
        deps=[*([] if cfg.scores_from_adopted() else [images]), *(embeddings_key(space) for space in fed)],
        check_specs=[gate_spec("scores")],
        kinds={"delta", "numpy"},
        description=(
            "One column per scoring head for every successful image (heads: " + heads + "). Each "
            "head reads the embeddings of the space it was trained on; feeding it another space "
            "is refused with a clear error unless the config allows it."
        ),
    )
    def _scores(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource):
        lk, cfg_now, shard = lake.lake(), pipeline.config(), context.partition_key
        yield from run_stage(
            context, lk, stages.SCORES, lambda: stages.run_scores(lk, cfg_now, shard),
            view=lambda: views.scores_view(lk, cfg_now, shard),
        )

    return _scores
