"""knn_<subset> (folder knn/<subset>): a kNN index of the subset's image embeddings, synced with
every shard."""

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from laion_assets.core.config import PipelineConfig
from laion_assets.core.exports.knn import index_folder, sync_index
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.stages import lakewide
from laion_assets.core.subsets.rules import SubsetConfig
from laion_assets.defs.gate import ShardFailed
from laion_assets.defs.keys import embeddings_key, knn_key, lake_path, subset_key
from laion_assets.defs.resources import LakeResource, PipelineResource

# Follow the subset: after shards were updated and none is in progress, whether or not every
# shard exists (one that never materializes must not hold the index back).
FOLLOW_SUBSET = AutomationCondition.eager().without(~AutomationCondition.any_deps_missing())


def knn_asset(sub: SubsetConfig, cfg: PipelineConfig) -> AssetsDefinition:
    space = cfg.knn_space(sub)

    @asset(
        key=knn_key(sub.name),
        deps=[subset_key(sub.name), embeddings_key(space)],
        metadata=lake_path(index_folder(sub.name)),
        kinds={"faiss"},
        group_name="exports",
        pool="knn",
        automation_condition=FOLLOW_SUBSET,
        description=(
            f"kNN index (faiss) of subset {sub.name} over space `{space}` "
            f"({cfg.embeddings.spaces[space].identity}): exact below {cfg.knn.exact_below} vectors, else "
            f"IVF,{cfg.knn.codec} tuned to recall@10 >= {cfg.knn.recall_target}. Synced shard by shard: "
            "unchanged shards are not re-read. Search it with `laion-assets search` or `serve`."
        ),
    )
    def _knn(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource):
        try:
            lk, cfg_now = lake.lake(), pipeline.config()
            report = lakewide.tracked(lk, cfg_now, index_folder(sub.name), lambda: sync_index(lk, cfg_now, sub.name))
        except LaionAssetsError as e:
            raise ShardFailed(str(e)) from None  # one line, no stack
        return MaterializeResult(metadata={
            **{k: v for k, v in report.as_metadata().items() if v is not None},
            "dagster/row_count": report.rows,
            "dagster/uri": MetadataValue.path(report.location),
        })

    return _knn


def knn_assets(cfg: PipelineConfig) -> list[AssetsDefinition]:
    return [knn_asset(sub, cfg) for sub in cfg.indexed_subsets()]
