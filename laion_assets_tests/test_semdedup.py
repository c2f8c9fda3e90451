"""SemDeDup over a published subset on real Delta tables: planted near-duplicates across
shards are found (one kept per group), unrelated rows are not, and the marks are a table."""

from __future__ import annotations

import numpy as np
import polars as pl

from laion_assets.core.curation import semdedup
from laion_assets.core.curation.config import CurationConfig, SemanticDedupConfig
from laion_assets.core.embeddings import vectors
from laion_assets.core.lake.delta import Lake
from laion_assets.core.stages import curation as stages
from laion_assets.core.subsets.rules import SubsetConfig
from laion_assets_tests.lakes import config, publish_shard, publish_subsets, row

DIM = 32


def planted_lake(tmp_path, groups: int = 8, per_shard: int = 30):
    """Three shards of random unit vectors; `groups` of them get 1-2 near-copies (cosine
    ~0.99) in other shards."""
    rng = np.random.default_rng(3)
    shards = {s: rng.normal(size=(per_shard, DIM)) for s in ("a", "b", "c")}
    truth = []
    for g in range(groups):
        src_shard, src = "abc"[g % 3], g
        members = [(src_shard, src)]
        for k in range(1 + g % 2):
            dst_shard = "abc"[(g + k + 1) % 3]
            dst = per_shard - 1 - g - 10 * k
            shards[dst_shard][dst] = shards[src_shard][src] / np.linalg.norm(shards[src_shard][src]) + rng.normal(size=DIM) * 0.01
            members.append((dst_shard, dst))
        truth.append({(s, uid(s, i)) for s, i in members})
    cfg = config(SubsetConfig(name="everything"), curation=CurationConfig(semantic=(SemanticDedupConfig(subset="everything", clusters=3, threshold=0.95),)))
    lake = Lake(tmp_path / "lake")
    for s, vecs in shards.items():
        publish_shard(lake, s, [row(uid(s, i), f"http://ex.com/{s}{i}.jpg", vector=v) for i, v in enumerate(vecs)], dim=DIM)
    publish_subsets(lake, cfg, list(shards))
    return lake, cfg, truth


def uid(shard: str, i: int) -> int:
    return 1000 * "abc".index(shard) + i


def test_planted_near_duplicates_are_found_and_one_of_each_group_kept(tmp_path):
    lake, cfg, truth = planted_lake(tmp_path)
    report = stages.run_semdedup(lake, cfg, cfg.curation.semantic[0])
    marks = pl.read_delta(lake.table_uri(semdedup.semdedup_table("everything")))
    removed = set(zip(marks["shard"], marks["uid"]))
    planted = set().union(*truth)
    assert removed <= planted  # precision 1: nothing unrelated removed
    for group in truth:  # recall 1: all but one of each group removed, marked by a member
        assert len(group - removed) == 1
        for shard, u, by_shard, by in marks.filter(pl.struct("shard", "uid").is_in([{"shard": s, "uid": x} for s, x in group])).select(
            "shard", "uid", "duplicate_of_shard", "duplicate_of").iter_rows():
            assert (by_shard, by) in group and (by_shard, by) != (shard, u)
    assert report["removed"] == len(planted) - len(truth) and report["rows"] == 90
    assert 0 < report["removed_fraction"] < 0.2


def test_threshold_above_the_planted_similarity_removes_nothing(tmp_path):
    lake, cfg, _ = planted_lake(tmp_path, groups=3)
    strict = cfg.curation.semantic[0].model_copy(update={"threshold": 0.99999})
    assert stages.run_semdedup(lake, cfg, strict)["removed"] == 0


def test_the_training_sample_does_not_depend_on_read_order():
    uids = np.arange(-5000, 5000, dtype=np.int64)
    picked = uids[semdedup.in_sample(uids, 0.1)]
    shuffled = np.random.default_rng(0).permutation(uids)
    assert set(picked) == set(shuffled[semdedup.in_sample(shuffled, 0.1)])
    assert 800 < len(picked) < 1200


def test_marks_do_not_depend_on_the_order_rows_are_read_in():
    """3,000 vectors with 300 planted near-copies and 30 exact copies, read once in shard order
    and once permuted across shards and batches: the marks (which member of each pair survives,
    and by which row it is marked) are identical."""
    rng = np.random.default_rng(7)
    n = 3000
    vecs = rng.normal(size=(n, DIM)).astype(np.float32)
    src, dst = rng.choice(n, size=(2, 330), replace=False)
    vecs[dst[:300]] = vecs[src[:300]] + rng.normal(size=(300, DIM)).astype(np.float32) * 0.05
    vecs[dst[300:]] = vecs[src[300:]]  # exact copies: a tie in every similarity, broken by (shard, uid)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    shards = np.array(["a", "b", "c"])[np.arange(n) % 3]
    uids = rng.permutation(n).astype(np.int64) * 7919 - 10_000_000
    cfg = SemanticDedupConfig(subset="everything", clusters=20, threshold=0.95, train_per_cluster=50)

    def stream_of(order: np.ndarray, batch: int):
        def stream():
            for shard in dict.fromkeys(shards[order]):  # shards in order of first appearance
                rows = order[shards[order] == shard]
                for i in range(0, len(rows), batch):
                    part = rows[i:i + batch]
                    # vectors as the lake holds them (float16 cells)
                    yield shard, uids[part], vectors.from_arrow(vectors.to_column(vecs[part], "float16"))
        return stream

    first = semdedup.semdedup(stream_of(np.arange(n), 500), n, cfg).removed
    permuted = semdedup.semdedup(stream_of(np.random.default_rng(1).permutation(n), 137), n, cfg).removed
    assert 300 <= first.height < 400  # the planted copies (and little else) are marked
    assert first.equals(permuted)
