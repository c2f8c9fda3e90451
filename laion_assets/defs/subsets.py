"""subsets: one asset (and Delta table) per subset declared in the config."""


import json

from dagster import AssetExecutionContext, AssetsDefinition, MetadataValue

from laion_assets.core import stages
from laion_assets.core.config import PipelineConfig
from laion_assets.core.stages.curation import run_curated_subset
from laion_assets.core.subsets.rules import SubsetConfig
from laion_assets.core.ui import views
from laion_assets.defs.gate import gate_spec, run_stage
from laion_assets.defs.images import images
from laion_assets.defs.keys import WATERMARK, embeddings_key, subset_key
from laion_assets.defs.language import language
from laion_assets.defs.partitions import shard_asset
from laion_assets.defs.raw_urls import raw_urls
from laion_assets.defs.resources import LakeResource, PipelineResource


def subset_asset(sub: SubsetConfig, cfg: PipelineConfig) -> AssetsDefinition:
    key = subset_key(sub.name)
    space = cfg.similarity_space(sub)
    rule = {"rule": sub.rule(), "similarity_space": space, "embedding_space": cfg.embeddings.spaces[space].identity}
    uses_watermark = "pwatermark" in cfg.score_columns(sub)

    @shard_asset(
        key=key,
        deps=[raw_urls, images, language, embeddings_key(space), "scores", *([WATERMARK] if uses_watermark else [])],
        check_specs=[gate_spec(key)],
        kinds={"delta", "polars"},
        description=(
            f"{sub.description or sub.name}"
            + (f" (preset `{sub.preset}`)" if sub.preset else "")
            + f". Rule: {json.dumps(rule, sort_keys=True)}. Each materialization records the full recipe "
            "(head files and sha256, spaces, language detector, code version) and the rows each rule dropped."
        ),
        metadata={"rule": MetadataValue.json(rule), **({"preset": sub.preset} if sub.preset else {})},
    )
    def _subset(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource):
        lk = lake.lake()
        cfg_now = pipeline.config()
        current = next(s for s in cfg_now.subsets if s.name == sub.name)
        table = stages.subset_table(sub.name)
        yield from run_stage(
            context, lk, table,
            lambda: run_curated_subset(lk, cfg_now, current, context.partition_key),
            view=lambda: views.subset_view(lk, cfg_now, current, context.partition_key, table),
        )

    return _subset


def subset_assets(cfg: PipelineConfig) -> list[AssetsDefinition]:
    return [subset_asset(sub, cfg) for sub in cfg.subsets]
