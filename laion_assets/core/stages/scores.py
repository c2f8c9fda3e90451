"""scores: the LAION heads, each over the image embeddings of the space it was trained on."""

from __future__ import annotations

import json

import polars as pl

from laion_assets.core.config import PipelineConfig
from laion_assets.core.embeddings import vectors
from laion_assets.core.lake import quality
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import explained
from laion_assets.core.lake.tables import IMAGES, SCORES, embeddings_table
from laion_assets.core.scores.heads import check_compatible, load_head
from laion_assets.core.stages import fingerprints
from laion_assets.core.stages.publish import StageOutput, gate, publish, uids


@explained
def run_scores(lake: Lake, cfg: PipelineConfig, shard: str) -> StageOutput:
    """One column per configured head, for every successful image: each head reads the
    embeddings of its own space (record batch by record batch: memory bounded for any shard
    size) and is refused if they are not the space it was trained on (unless allowed)."""
    fingerprint = fingerprints.current(lake, cfg, SCORES, shard)
    # in uid order: the images table holds its rows in the order they were downloaded
    rows = pl.DataFrame({"uid": uids(lake, IMAGES, shard, pl.col("status") == "success")}).sort("uid")
    heads, ranges = {}, {}
    for name, hcfg in cfg.scores.heads.items():
        space = cfg.head_space(name)
        table = embeddings_table(space)
        first = lake.scan(table).filter(pl.col("shard") == shard).select("image_embedding", "embedding_space").head(1).collect()
        identity = first["embedding_space"][0] if first.height else cfg.embeddings.spaces[space].identity
        dim = vectors.from_column(first["image_embedding"]).shape[1] if first.height else None
        head = load_head(name, hcfg)
        check_compatible(head, dim, identity, cfg.scores.allow_embedding_space_mismatch)
        parts = [
            pl.DataFrame({"uid": pl.from_arrow(b["uid"]), name: pl.Series(name, head(vectors.from_arrow(b["image_embedding"], dim)), pl.Float32)})
            for b in lake.batches(table, shard, ["uid", "image_embedding"])
        ]
        scored = pl.concat(parts) if parts else pl.DataFrame(schema={"uid": pl.Int64, name: pl.Float32})
        rows = rows.join(scored, on="uid", how="left", maintain_order="left")
        heads[name] = {**head.describe(), "space": space, "fed": identity}
        ranges[name] = (0.0, 1.0) if head.probability else (-100.0, 100.0)
    stats = {"heads": heads, **{f"mean_{name}": rows[name].mean() for name in heads}}
    report = gate(SCORES, shard, rows, quality.scores_suite(rows.height, ranges), stats)
    # which head file made each column, on every row: a subset checks it against its recipe
    rows = rows.with_columns(head_files=pl.lit(json.dumps({n: h["sha256"] for n, h in heads.items()}, sort_keys=True)))
    return publish(lake, SCORES, shard, rows, report, stats, {"heads": json.dumps(heads, sort_keys=True)}, fingerprint)
