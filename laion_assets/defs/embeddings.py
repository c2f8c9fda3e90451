"""embeddings: open_clip image and text embeddings of the successful images."""

from functools import lru_cache

from dagster import AssetExecutionContext

from laion_assets.core import stages
from laion_assets.core.config import EmbeddingConfig
from laion_assets.defs.gate import gate_spec, run_stage
from laion_assets.defs.images import images
from laion_assets.defs.partitions import shard_asset
from laion_assets.defs.resources import LakeResource, PipelineResource


@lru_cache(maxsize=2)
def encoder_for(cfg: EmbeddingConfig):
    """Models are loaded once per process and reused across shards (torch and open_clip are
    imported here, so runs that do not embed start faster)."""
    from laion_assets.core.clip import Encoder, load_model

    return Encoder(load_model(cfg), cfg.batch_size, cfg.workers, compile=cfg.compile, gpu_decode=cfg.gpu_decode)


@shard_asset(
    deps=[images],
    check_specs=[gate_spec("embeddings")],
    pool="gpu",
    kinds={"delta", "pytorch"},
    group_name="laion",
)
def embeddings(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource):
    """L2-normalised CLIP image and text embeddings (float16 bytes by default) and their
    cosine `similarity`, with the `embedding_space` (model/pretrained) they live in."""
    lk = lake.lake()
    cfg = pipeline.config()
    if cfg.embeddings.model == "tiny":
        from laion_assets.core.clip import TINY_WARNING

        context.log.warning(TINY_WARNING)
    yield from run_stage(
        context, lk, stages.EMBEDDINGS,
        lambda: stages.run_embeddings(lk, cfg, context.partition_key, lambda: encoder_for(cfg.embeddings)),
    )
