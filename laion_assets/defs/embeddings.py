"""embeddings_<space> (table embeddings/<space>): open_clip image and text embeddings of the successful images, one asset
(and Delta table) per configured space, all computed by one step that decodes each image once."""

from functools import lru_cache

from dagster import AssetExecutionContext, AssetsDefinition, AssetSpec, multi_asset

from laion_assets.core import stages
from laion_assets.core.config import PipelineConfig
from laion_assets.core.ui import views
from laion_assets.core.stages.adopt import run_adopted_embeddings
from laion_assets.defs.gate import gate_spec, run_stage, run_stages
from laion_assets.defs.images import images
from laion_assets.defs.keys import WATERMARK, embeddings_key, lake_path
from laion_assets.defs.partitions import pool_op_tags, shard_asset, shard_backfill, shards
from laion_assets.defs.raw_urls import raw_urls
from laion_assets.defs.resources import LakeResource, PipelineResource


@lru_cache(maxsize=2)
def _encoder(embeddings_json: str, watermark_json: str, towers: tuple[str, ...]):
    """Models are loaded once per process and reused across shards (torch and open_clip are
    imported here, so runs that do not embed start faster). The tower named "watermark" is the
    watermark classifier."""
    from laion_assets.core.embeddings.clip import _device, load_model
    from laion_assets.core.embeddings.config import EmbeddingConfig
    from laion_assets.core.embeddings.encoder import Encoder
    from laion_assets.core.scores import watermark
    from laion_assets.core.scores.config import WatermarkConfig

    cfg = EmbeddingConfig.model_validate_json(embeddings_json)
    models = [
        watermark.load(WatermarkConfig.model_validate_json(watermark_json), _device(cfg.device)) if t == "watermark"
        else load_model(cfg.spaces[t], cfg.device, cfg.precision)
        for t in towers
    ]
    batch = min((cfg.spaces[s].batch_size or cfg.batch_size for s in towers if s in cfg.spaces), default=cfg.batch_size)
    return Encoder(models, batch, cfg.workers, compile=cfg.compile, gpu_decode=cfg.gpu_decode)


def encoder_for(cfg: PipelineConfig, towers) -> object:
    wm = cfg.watermark.model_dump_json() if cfg.watermark else "null"
    return _encoder(cfg.embeddings.model_dump_json(), wm, tuple(towers))


def embeddings_assets(cfg: PipelineConfig) -> list[AssetsDefinition]:
    """One asset per space: the computed ones in one step (a run may select any of them, and the
    step computes only those), each adopted one on its own."""
    computed = _computed_assets(cfg)
    return [*([computed] if computed else []), *(adopted_asset(name, cfg) for name, sp in cfg.embeddings.spaces.items() if sp.adopted)]


def adopted_asset(name: str, cfg: PipelineConfig) -> AssetsDefinition:
    space = cfg.embeddings.spaces[name]

    @shard_asset(
        key=embeddings_key(name), deps=[raw_urls], check_specs=[gate_spec(embeddings_key(name))], kinds={"delta", "numpy"},
        description=(
            f"Space `{name}` ({space.identity}), adopted: published vectors (LAION's parquet_npy layout: "
            "img_emb/, text_emb/ beside the metadata file the shard's raw_urls came from), checked by the "
            "embeddings gate and published as they are; no image is needed (`laion-assets adopt-embeddings`)."
        ),
        metadata={"embedding_space": space.identity, "adopted": True, **lake_path(stages.embeddings_table(name))},
    )
    def _adopted(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource):
        lk, cfg_now, shard = lake.lake(), pipeline.config(), context.partition_key
        yield from run_stage(
            context, lk, stages.embeddings_table(name), lambda: run_adopted_embeddings(lk, cfg_now, shard, name),
            view=lambda: views.embeddings_view(lk, cfg_now, shard, name),
        )

    return _adopted


def _computed_assets(cfg: PipelineConfig) -> AssetsDefinition | None:
    specs = [
        AssetSpec(
            embeddings_key(name), deps=[images], kinds={"delta", "pytorch"},
            description=(
                f"Space `{name}` ({space.identity}): L2-normalised CLIP image and text embeddings "
                "(float16 bytes by default) and their cosine `similarity`, with the "
                "`embedding_space` they live in."
            ),
            metadata={"embedding_space": space.identity, **lake_path(stages.embeddings_table(name))},
            skippable=True,
        )
        for name, space in cfg.embeddings.spaces.items() if not space.adopted
    ]
    if not specs:
        return None
    if cfg.watermark:
        specs.append(AssetSpec(
            WATERMARK, deps=[images], kinds={"delta", "pytorch"}, group_name="laion", skippable=True,
            description=(
                f"`pwatermark` of every successful image from the {cfg.watermark.model} pixel classifier "
                "(LAION's: EfficientNet-B3), computed in the embeddings pass on the image it decodes "
                "for CLIP; `watermark_model` says which weights. An untrained model is flagged loudly."
            ),
        ))

    @multi_asset(
        name="embeddings", specs=specs, check_specs=[gate_spec(s.key) for s in specs],
        can_subset=True, partitions_def=shards, backfill_policy=shard_backfill, pool="gpu", op_tags=pool_op_tags("gpu"),
    )
    def _embeddings(context: AssetExecutionContext, lake: LakeResource, pipeline: PipelineResource):
        lk = lake.lake()
        cfg_now = pipeline.config()
        chosen = [name for name, sp in cfg_now.embeddings.spaces.items() if not sp.adopted and embeddings_key(name) in context.selected_asset_keys]
        watermark = cfg_now.watermark is not None and WATERMARK in context.selected_asset_keys
        tables = {embeddings_key(name): stages.embeddings_table(name) for name in chosen}
        if watermark:
            tables[WATERMARK] = stages.WATERMARK
        for name in chosen:
            space = cfg_now.embeddings.spaces[name]
            if space.model in ("tiny", "tiny-l"):
                context.log.warning(f"space {name}: {space.model} is a random model: its embeddings are MEANINGLESS")
        yield from run_stages(
            context, lk, tables,
            lambda: {
                WATERMARK if name == "watermark" else embeddings_key(name): out
                for name, out in stages.run_embeddings(
                    lk, cfg_now, context.partition_key, lambda towers: encoder_for(cfg_now, towers), chosen, watermark=watermark,
                ).items()
            },
            views={
                embeddings_key(name): lambda name=name: views.embeddings_view(lk, cfg_now, context.partition_key, name)
                for name in chosen
            },
        )

    return _embeddings
