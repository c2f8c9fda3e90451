"""webdataset_<subset> (folder webdataset/<subset>): the subset as webdataset tars for training,
in img2dataset's output layout (or one folder per shard)."""

from dagster import AssetExecutionContext, AssetsDefinition, MaterializeResult, MetadataValue

from laion_assets.core.config import PipelineConfig
from laion_assets.core.exports.webdataset import export_folder, export_shard
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.subsets.rules import SubsetConfig
from laion_assets.defs.gate import ShardFailed
from laion_assets.defs.images import images
from laion_assets.defs.keys import lake_path, subset_key, webdataset_key
from laion_assets.defs.partitions import shard_asset
from laion_assets.defs.resources import LakeResource, PipelineResource


def webdataset_asset(sub: SubsetConfig) -> AssetsDefinition:
    @shard_asset(
        key=webdataset_key(sub.name),
        deps=[subset_key(sub.name), images],
        kinds={"webdataset", "parquet"},
        group_name="exports",
        description=(
            f"Subset {sub.name} as webdataset tars in img2dataset's output layout ({{key}}.jpg, .txt, .json; "
            "tars numbered across shards; per tar a parquet with every row's status and img2dataset's "
            "stats; sizes.json for open_clip). A shard whose subset and images files are unchanged keeps its tars."
        ),
        metadata=lake_path(export_folder(sub.name)),
    )
    def _webdataset(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource):
        try:
            report = export_shard(lake.lake(), pipeline.config(), sub.name, context.partition_key)
        except LaionAssetsError as e:
            raise ShardFailed(str(e)) from None  # one line, no stack
        context.log.info(f"{sub.name}/{context.partition_key}: {report.samples} samples in {len(report.tars)} tars ({'written' if report.rewritten else 'unchanged, kept'})")
        return MaterializeResult(metadata={
            **report.as_metadata(),
            "dagster/row_count": report.samples,
            "dagster/uri": MetadataValue.path(report.location),
        })

    return _webdataset


def webdataset_assets(cfg: PipelineConfig) -> list[AssetsDefinition]:
    return [webdataset_asset(sub) for sub in cfg.exported_subsets()]
