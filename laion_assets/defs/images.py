"""images: every URL of a shard downloaded, checked, resized and re-encoded."""

from dagster import AssetExecutionContext, Config
from pydantic import Field

from laion_assets.core import stages
from laion_assets.core.ui import views
from laion_assets.defs.gate import gate_spec, run_stage
from laion_assets.defs.partitions import shard_asset
from laion_assets.defs.raw_urls import raw_urls
from laion_assets.defs.resources import LakeResource, PipelineResource


class ImagesRunConfig(Config):
    retry_failures: bool = Field(
        False, description="Re-download only the published rows whose failure is retryable (timeouts, 429, 5xx); keep the rest."
    )


@shard_asset(
    deps=[raw_urls],
    check_specs=[gate_spec("images")],
    pool="download",
    kinds={"delta"},
)
def images(context: AssetExecutionContext, config: ImagesRunConfig, lake: LakeResource, pipeline: PipelineResource):
    """One row per input row: `status` (success or the failure kind), `error`, HTTP status,
    original and stored sizes, sha256 of the original bytes, and the re-encoded `image`.
    Finished chunks are staged, so a killed run resumes without downloading them again.
    A shard adopted from an img2dataset download (`laion-assets adopt-images`) is read from its
    folder instead, whenever it runs: the bytes img2dataset stored, checked to decode, no request."""
    lk, cfg, shard = lake.lake(), pipeline.config(), context.partition_key
    yield from run_stage(
        context, lk, stages.IMAGES,
        lambda: stages.run_images(
            lk, cfg, shard, retry_failures=config.retry_failures,
            on_progress=lambda p: context.log.info(f"shard {shard}: {p.line()}"),
        ),
        view=lambda: views.images_view(lk, cfg, shard),
    )
