"""scores: the LAION heads over a shard's image embeddings."""

from __future__ import annotations

import polars as pl

from laion_assets.core import quality, vectors
from laion_assets.core.config import PipelineConfig
from laion_assets.core.heads import configured_heads
from laion_assets.core.lake import Lake
from laion_assets.core.stages.publish import EMBEDDINGS, SCORES, StageOutput, gate, publish


def run_scores(lake: Lake, cfg: PipelineConfig, shard: str) -> StageOutput:
    """Aesthetic and NSFW heads over the image embeddings, both in one pass over record
    batches (memory bounded for any shard size); unscored is null."""
    first = lake.scan(EMBEDDINGS).filter(pl.col("shard") == shard).select("image_embedding", "embedding_space").head(1).collect()
    space = first["embedding_space"][0] if first.height else cfg.embeddings.space
    dim = vectors.from_column(first["image_embedding"]).shape[1] if first.height else None
    heads = configured_heads(cfg.scores, space, dim)
    parts = []
    for b in lake.batches(EMBEDDINGS, shard, ["uid", "image_embedding", "embedding_space"]):
        x = vectors.from_arrow(b["image_embedding"], dim)
        cols = {"uid": pl.from_arrow(b["uid"]), "embedding_space": pl.from_arrow(b["embedding_space"])}
        for name, head in (("aesthetic", heads.get("aesthetic")), ("punsafe", heads.get("nsfw"))):
            cols[name] = (
                pl.Series(name, head(x), pl.Float32) if head is not None
                else pl.repeat(None, b.num_rows, dtype=pl.Float32, eager=True)
            )
        parts.append(pl.DataFrame(cols).select("uid", "aesthetic", "punsafe", "embedding_space"))
    rows = pl.concat(parts) if parts else pl.DataFrame(schema={"uid": pl.Int64, "aesthetic": pl.Float32, "punsafe": pl.Float32, "embedding_space": pl.String})
    report = gate(SCORES, shard, rows.select("uid", "aesthetic", "punsafe"), quality.scores_suite(rows.height))
    stats = {
        "heads": {k: f"{h.kind} {h.path} (trained on {h.trained_on})" for k, h in heads.items()},
        "mean_aesthetic": rows["aesthetic"].mean(), "mean_punsafe": rows["punsafe"].mean(),
        "embedding_space": space if first.height else "",
    }
    return publish(lake, SCORES, shard, rows, report, stats)
