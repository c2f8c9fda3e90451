"""Semantic near-duplicates of a subset (SemDeDup, Abbas et al. 2023), in memory bounded by the
number of clusters, not the lake.

1. k-means (faiss, spherical, seeded) on a training sample of the subset's image embeddings in
   one space; the sample is picked by a hash of the uid and sorted by (shard, uid) before
   training (k-means' initialisation and subsampling pick points by position).
2. The vectors are streamed shard by shard, assigned to their nearest centroid (in float64,
   row by row in effect: no batch can change a row's cluster), and spilled to local disk
   grouped by cluster (float16).
3. Cluster by cluster, members first sorted by (shard, uid) so every number below is computed
   from the same matrix whatever the read order: members are ordered by cosine similarity to
   their centroid, least similar first (SemDeDup's default, keeping the least prototypical
   example), ties by (shard, uid); a member is removed when a member earlier in that order has
   a cosine similarity above the threshold with it, and marked with the earliest such member.
   In a group of mutual near-duplicates exactly one, the first in that order, is kept.

The marks are therefore a function of the subset's rows, not of the order they are read in.

Memory: k centroids, the training sample (k x train_per_cluster vectors) and one cluster.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds

from laion_assets.core.curation.config import SemanticDedupConfig
from laion_assets.core.embeddings import vectors
from laion_assets.core.lake.delta import Lake

MARKS_SCHEMA = pa.schema([
    ("uid", pa.int64()), ("cluster", pa.int32()), ("duplicate_of_shard", pa.string()), ("duplicate_of", pa.int64()),
    ("similarity", pa.float32()), ("shard", pa.string()),
])
# Spilled per cluster on local disk between the assignment and the per-cluster pass.
_SPILL = pa.schema([("shard", pa.string()), ("uid", pa.int64()), ("vector", pa.binary()), ("cluster", pa.int32())])
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def semdedup_table(subset: str) -> str:
    return f"curation/semdedup/{subset}"


def in_sample(uids: np.ndarray, fraction: float) -> np.ndarray:
    """A deterministic pseudo-random `fraction` of uids (Fibonacci hashing of the uid)."""
    if fraction >= 1:
        return np.ones(len(uids), bool)
    with np.errstate(over="ignore"):
        h = uids.astype(np.int64).view(np.uint64) * _GOLDEN
    return h < np.uint64(int(fraction * 2**64))


@dataclass
class SemDedupResult:
    rows: int
    clusters: int
    removed: pl.DataFrame  # shard, uid, cluster, duplicate_of_shard, duplicate_of, similarity
    largest_cluster: int


Batch = tuple[str, np.ndarray, np.ndarray]  # shard, uids, (n, dim) float32 unit vectors


def semdedup(stream, rows: int, cfg: SemanticDedupConfig, spill_dir: str | None = None) -> SemDedupResult:
    """SemDeDup over `stream()`, a callable giving the batches afresh (it is read twice)."""
    empty = pl.from_arrow(MARKS_SCHEMA.empty_table())
    if rows == 0:
        return SemDedupResult(0, 0, empty, 0)
    import faiss

    fraction = cfg.clusters * cfg.train_per_cluster / rows
    keys, sample = [], []
    for shard, u, v in stream():
        picked = in_sample(u, fraction)
        keys.append(pl.DataFrame({"shard": [shard] * int(picked.sum()), "uid": u[picked]}, schema={"shard": pl.String, "uid": pl.Int64}))
        sample.append(v[picked])
    order = pl.concat(keys).with_row_index("row").sort("shard", "uid")["row"].to_numpy()
    train = np.ascontiguousarray(np.concatenate(sample)[order], np.float32)
    k = max(1, min(cfg.clusters, len(train)))
    km = faiss.Kmeans(train.shape[1], k, niter=20, seed=cfg.seed, spherical=True, verbose=False,
                      max_points_per_centroid=cfg.train_per_cluster, min_points_per_centroid=1)
    km.train(train)
    del train, sample, keys
    centroids = km.centroids.astype(np.float64)
    spill = tempfile.mkdtemp(prefix="semdedup-", dir=spill_dir)
    try:
        ds.write_dataset(
            _assigned(stream, centroids), spill, format="parquet", partitioning=["cluster"],
            partitioning_flavor="hive", max_partitions=k + 1, max_open_files=256, existing_data_behavior="overwrite_or_ignore",
            schema=_SPILL,
        )
        removed, largest = [], 0
        dataset = ds.dataset(spill, format="parquet", partitioning="hive", schema=_SPILL)
        for c in range(k):
            members = dataset.to_table(filter=ds.field("cluster") == c)
            largest = max(largest, members.num_rows)
            removed.append(_cluster_duplicates(members, c, centroids[c], cfg.threshold))
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    out = pl.concat([empty.select(MARKS_SCHEMA.names), *removed]) if removed else empty
    return SemDedupResult(rows, k, out.sort("shard", "uid"), largest)


def nearest(vecs: np.ndarray, centroids: np.ndarray, rows: int = 4096) -> np.ndarray:
    """Each vector's nearest centroid by cosine, in float64 and blocks of `rows` (float32 BLAS
    kernels round a row differently with the batch around it: a near tie could flip)."""
    return np.concatenate([
        np.argmax(vecs[i:i + rows].astype(np.float64) @ centroids.T, axis=1) for i in range(0, len(vecs), rows)
    ]) if len(vecs) else np.zeros(0, np.int64)


def _assigned(stream, centroids: np.ndarray) -> Iterator[pa.RecordBatch]:
    for shard, uids, vecs in stream():
        yield pa.RecordBatch.from_arrays([
            pa.array([shard] * len(uids), pa.string()), pa.array(uids, pa.int64()),
            vectors.to_column(vecs, "float16"), pa.array(nearest(vecs, centroids), pa.int32()),
        ], schema=_SPILL)


def _cluster_duplicates(members: pa.Table, cluster: int, centroid: np.ndarray, threshold: float) -> pl.DataFrame:
    import faiss

    if members.num_rows < 2:
        return pl.from_arrow(MARKS_SCHEMA.empty_table())
    canonical = members.sort_by([("shard", "ascending"), ("uid", "ascending")])
    x = vectors.from_arrow(canonical.column("vector")).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    df = pl.from_arrow(canonical.select(["shard", "uid"])).with_columns(
        centroid_similarity=pl.Series(x @ (centroid / max(np.linalg.norm(centroid), 1e-12))),
    ).with_row_index("row").sort("centroid_similarity", "shard", "uid")
    x = np.ascontiguousarray(x[df["row"].to_numpy()], np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, sims, ids = index.range_search(x, threshold)
    query = np.repeat(np.arange(len(x)), np.diff(lims).astype(np.int64))
    earlier = ids < query  # positions in keep order: a member is removed by an earlier one
    if not earlier.any():
        return pl.from_arrow(MARKS_SCHEMA.empty_table())
    pairs = pl.DataFrame({"pos": query[earlier], "by": ids[earlier].astype(np.int64), "similarity": sims[earlier]})
    first = pairs.sort("by").group_by("pos").first()
    ordered = df.with_row_index("pos").with_columns(pl.col("pos").cast(pl.Int64))
    first = first.join(ordered.select("pos", "shard", "uid"), on="pos").join(
        ordered.select(pl.col("pos").alias("by"), pl.col("shard").alias("duplicate_of_shard"), pl.col("uid").alias("duplicate_of")), on="by",
    )
    return first.select(
        "uid", pl.lit(cluster, pl.Int32).alias("cluster"), "duplicate_of_shard", "duplicate_of",
        pl.col("similarity").cast(pl.Float32), "shard",
    )


def subset_stream(lake: Lake, subset_table: str, embeddings_table: str):
    """The subset's rows and their image embeddings, shard by shard (a callable: read twice)."""
    shards = sorted(lake.scan(subset_table).select("shard").unique().collect()["shard"].to_list())
    rows = lake.scan(subset_table).select(pl.len()).collect().item()

    def stream() -> Iterator[Batch]:
        for shard in shards:
            uids = lake.read_shard(subset_table, shard, ["uid"])["uid"].to_list()
            for batch in lake.batches(embeddings_table, shard, ["uid", "image_embedding"], uids=uids):
                yield shard, batch.column("uid").to_numpy(), vectors.from_arrow(batch.column("image_embedding"))

    return stream, rows
