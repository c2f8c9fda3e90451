"""A kNN index of a subset's image embeddings in one space (faiss, inner product on unit
vectors = cosine), kept in sync with the subset shard by shard:

    knn/<subset>/manifest.json          what the index holds: the space and how to load its model
                                        (what a searcher embeds queries with), subset Delta
                                        version, per shard its fingerprint, id range and id-mapping file
    knn/<subset>/index-<version>.faiss  the faiss index (read memory-mapped for search)
    knn/<subset>/ids/<shard>-<fp>.arrow uid, url, caption of the indexed rows, in id order, with
                                        sha256 and the scores a search filters on (HIT_COLUMNS)

The index type follows the size, autofaiss-style: exact (flat) below `knn.exact_below`
vectors, else IVF with a compressed code (`knn.codec`, SQ8 by default: 4x smaller than
float32), nlist ~ 2 sqrt(n), trained on a sample spread over every shard, and `nprobe` tuned
at build until recall@10 against exact search on sampled queries reaches `knn.recall_target`.

Ids are `shard ordinal << 32 | row`, so a shard's vectors are one id range: a new shard is
added, a changed shard (new Delta version, e.g. a blocklist pass) is removed and re-added, and
nothing is re-read for unchanged shards. The index is rebuilt when its type, space or code
changes or the subset grew 4x past what the IVF was trained for. An index whose manifest does
not name its query model (made before manifests did) gets it at its next sync, as a new
version: nothing is re-read.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa

from laion_assets import __version__
from laion_assets.core.embeddings import vectors
from laion_assets.core.embeddings.config import SpaceConfig
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.lake.files import LakeFiles, shard_fingerprint
from laion_assets.core.lake.tables import embeddings_table, subset_table

if TYPE_CHECKING:  # the searcher reads manifests without the pipeline config's sections
    from laion_assets.core.config import PipelineConfig

MANIFEST = "manifest.json"
FORMAT = 2  # 2: the id mapping carries HIT_COLUMNS
K = 10
TUNING_QUERIES = 256
ROW_BITS = 32
# subset columns kept beside uid, url, caption in the id mapping, where the subset has them: a
# search collapses hits of one image (sha256) and filters or re-ranks on scores without the lake
HIT_COLUMNS = ("sha256", "punsafe", "pwatermark", "aesthetic", "aesthetic_v2", "pviolence")


def index_folder(subset: str = "") -> str:
    return f"knn/{subset}".rstrip("/")


def query_model(space: SpaceConfig) -> dict:
    """How a searcher loads the space's model to embed queries: open_clip name, pretrained tag,
    checkpoint (absolute, so a search from another folder finds it)."""
    model = space.model_dump(mode="json", include={"model", "pretrained", "checkpoint"})
    if space.checkpoint:
        model["checkpoint"] = str(Path(space.checkpoint).resolve())
    return model


def shard_ids(ordinal: int, rows: int) -> np.ndarray:
    return (np.int64(ordinal) << ROW_BITS) + np.arange(rows, dtype=np.int64)


def nlist_for(n: int) -> int:
    """IVF lists: ~2 sqrt(n) as a power of two, at least 39 training points per list."""
    want = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n))))
    return int(max(1, min(want, 65536, 2 ** int(math.log2(max(1, n // 39))))))


@dataclass
class IndexReport:
    subset: str
    space: str
    kind: str
    factory: str
    rows: int
    version: int
    subset_version: int
    rebuilt: bool
    added_shards: int
    replaced_shards: int
    removed_shards: int
    unchanged_shards: int
    nprobe: int | None
    recall_at_10: float | None
    seconds: float
    location: str

    def as_metadata(self) -> dict:
        return asdict(self)


def sync_index(lake: Lake, cfg: PipelineConfig, subset: str) -> IndexReport:
    """Bring the subset's index up to date with the subset table; returns what it did."""
    import faiss

    start = time.monotonic()
    sub = next((s for s in cfg.subsets if s.name == subset), None)
    if sub is None:
        raise LaionAssetsError(f"no subset '{subset}' in the config ({', '.join(s.name for s in cfg.subsets)})")
    space = cfg.knn_space(sub)
    table, emb = subset_table(subset), embeddings_table(space)
    for t in (table, emb):
        if not lake.exists(t):
            raise LaionAssetsError(f"table '{t}' does not exist in lake {lake.uri}: materialize it before indexing subset {subset}")
    files = LakeFiles(lake, index_folder(subset))
    old = files.read_json(MANIFEST)
    subset_version = lake.table(table).version()
    counts = dict(lake.scan(table).group_by("shard").len().collect().iter_rows())
    settings = {
        "embedding_space": cfg.embeddings.spaces[space].identity, "codec": cfg.knn.codec,
        "exact_below": cfg.knn.exact_below, "recall_target": cfg.knn.recall_target, "format": FORMAT,
    }
    fps = {s: shard_fingerprint(lake, [table, emb], s) for s in sorted(counts)}
    total = sum(counts.values())
    kind = "flat" if total < cfg.knn.exact_below else "ivf"
    model = query_model(cfg.embeddings.spaces[space])
    rebuild = (
        old is None or old["settings"] != settings or old["kind"] != kind
        or (kind == "ivf" and total > 4 * old["trained_for"])
    )
    known = {} if rebuild else old["shards"]
    changed = [s for s in fps if s not in known or known[s]["fingerprint"] != fps[s]]
    removed = [s for s in known if s not in fps]
    if not rebuild and not changed and not removed and old.get("query_model") == model:
        return _report(old, files, rebuilt=False, counts=(0, 0, 0, len(fps)), seconds=time.monotonic() - start)

    shards = {s: dict(info) for s, info in known.items() if s not in removed}
    next_ordinal = max([info["ordinal"] for info in known.values()] + [-1]) + 1
    with tempfile.TemporaryDirectory(prefix="laion-knn-") as tmp:
        if rebuild:
            index, tuning, dim = _new_index(lake, table, emb, sorted(fps), kind, cfg, total)
            factory = "Flat" if kind == "flat" else f"IVF{index.nlist},{cfg.knn.codec}"
        else:
            index = faiss.read_index(files.local_path(old["index"], tmp))
            tuning, dim, factory = None, old["dim"], old["factory"]
            for s in changed + removed:
                if s in known:
                    lo = known[s]["ordinal"] << ROW_BITS
                    index.remove_ids(faiss.IDSelectorRange(lo, lo + (1 << ROW_BITS)))
        for s in changed:
            rows, vecs = shard_vectors(lake, table, emb, s)
            if s in shards:
                ordinal = shards[s]["ordinal"]
            else:
                ordinal, next_ordinal = next_ordinal, next_ordinal + 1
            ids = shard_ids(ordinal, rows.height)
            if vecs.shape[0]:
                if vecs.shape[1] != dim:
                    raise LaionAssetsError(f"shard {s} of {emb} has {vecs.shape[1]}-d vectors, the index {dim}-d: rebuild after re-embedding")
                index.add_with_ids(vecs, ids)
                if tuning is not None:
                    tuning.add(vecs, ids)
            name = f"ids/{s}-{fps[s]}.arrow"
            files.put_file(name, lambda path, rows=rows: _write_ids(rows, path))
            shards[s] = {"ordinal": ordinal, "fingerprint": fps[s], "rows": rows.height, "ids": name}
        nprobe, recall = (old["nprobe"], old["recall_at_10"]) if not rebuild else (None, 1.0)
        if rebuild and kind == "ivf":
            nprobe, recall = tuning.tune(index, cfg.knn.recall_target)
        version = (old["version"] + 1) if old else 0
        name = f"index-{version:06d}.faiss"
        files.put_file(name, lambda path: faiss.write_index(index, path))
    manifest = {
        "subset": subset, "space": space, "query_model": model, "settings": settings, "kind": kind, "factory": factory, "dim": dim,
        "rows": int(index.ntotal), "trained_for": total if rebuild else old["trained_for"], "nprobe": nprobe,
        "recall_at_10": recall, "version": version, "index": name, "subset_version": subset_version,
        "shards": shards, "code_version": __version__, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    current = files.read_json(MANIFEST)
    if (current or {}).get("version") != (old or {}).get("version"):
        raise LaionAssetsError(f"another build of the {subset} index committed version {current['version']} meanwhile: run again")
    files.write_json(MANIFEST, manifest)
    _collect_garbage(files, manifest, old)
    counts = (len([s for s in changed if s not in known]), len([s for s in changed if s in known]), len(removed), len(fps) - len(changed))
    return _report(manifest, files, rebuilt=rebuild, counts=counts, seconds=time.monotonic() - start)


def _report(m: dict, files: LakeFiles, rebuilt: bool, counts: tuple, seconds: float) -> IndexReport:
    return IndexReport(
        m["subset"], m["space"], m["kind"], m["factory"], m["rows"], m["version"], m["subset_version"], rebuilt,
        *counts, m["nprobe"], m["recall_at_10"], round(seconds, 3), files.uri(),
    )


def shard_vectors(lake: Lake, table: str, emb: str, shard: str) -> tuple[pl.DataFrame, np.ndarray]:
    """The subset rows of a shard that have an image embedding (uid order) and their vectors."""
    present = lake.scan(table).collect_schema().names()
    rows = lake.read_shard(table, shard, ["uid", "url", "caption", *(c for c in HIT_COLUMNS if c in present)]).sort("uid")
    uids, parts = [], []
    for batch in lake.batches(emb, shard, ["uid", "image_embedding"], uids=rows["uid"].to_list()):
        uids.append(pl.from_arrow(batch["uid"]))
        parts.append(vectors.from_arrow(batch["image_embedding"]))
    if not parts:
        return rows.clear(), np.zeros((0, 0), np.float32)
    found = pl.DataFrame({"uid": pl.concat(uids), "pos": np.arange(sum(len(u) for u in uids))}).unique("uid", keep="first")
    rows = rows.join(found, on="uid", how="inner", maintain_order="left")
    vecs = np.concatenate(parts)[rows["pos"].to_numpy()]
    return rows.drop("pos"), np.ascontiguousarray(vecs, np.float32)


def _write_ids(rows: pl.DataFrame, path: str) -> None:
    table = rows.to_arrow()
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


class _Tuning:
    """Exact neighbours of sampled indexed vectors, accumulated shard by shard, to tune nprobe.
    A query's own vector is left out of both sides (it is indexed, and would make recall look
    better than for a new query)."""

    def __init__(self, queries: np.ndarray, own_ids: np.ndarray):
        import faiss

        self.queries, self.own = queries, own_ids
        self.heap = faiss.ResultHeap(len(queries), K + 1, keep_max=True)

    def add(self, vecs: np.ndarray, ids: np.ndarray) -> None:
        import faiss

        k = min(K + 1, len(vecs))
        d, i = faiss.knn(self.queries, vecs, k, metric=faiss.METRIC_INNER_PRODUCT)
        if k < K + 1:  # a shard smaller than k
            d = np.pad(d, ((0, 0), (0, K + 1 - k)), constant_values=-np.inf)
            i = np.pad(i, ((0, 0), (0, K + 1 - k)), constant_values=-1)
        self.heap.add_result(d, np.where(i >= 0, ids[np.maximum(i, 0)], -1))

    def _others(self, rows: np.ndarray) -> list[set]:
        return [set(r[(r >= 0) & (r != own)][:K].tolist()) for r, own in zip(rows, self.own)]

    def tune(self, index, target: float) -> tuple[int, float]:
        """The smallest power-of-two nprobe whose recall@10 reaches the target."""
        self.heap.finalize()
        truth = self._others(self.heap.I)
        nprobe = 1
        while True:
            index.nprobe = nprobe
            got = self._others(index.search(self.queries, K + 1)[1])
            recall = float(np.mean([len(g & t) / max(1, len(t)) for g, t in zip(got, truth)]))
            if recall >= target or nprobe >= index.nlist:
                return nprobe, round(recall, 4)
            nprobe *= 2


def _new_index(lake: Lake, table: str, emb: str, shards: list[str], kind: str, cfg: PipelineConfig, total: int):
    """An empty index of the right type; an IVF one trained on a sample spread over every
    shard (TUNING_QUERIES of them, with their ids, become the tuning queries)."""
    import faiss

    first = lake.scan(emb).select("image_embedding").head(1).collect()
    if not first.height:
        raise LaionAssetsError(
            f"{emb} holds 0 rows (materialized, but no shard has a stored image yet): nothing to index; "
            "see the images stage's status counts, then rerun"
        )
    dim = vectors.from_column(first["image_embedding"]).shape[1]
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), None, dim
    nlist = nlist_for(total)
    stride = max(1, total // (40 * nlist))
    train, train_ids = [np.zeros((0, dim), np.float32)], [np.zeros(0, np.int64)]
    for ordinal, s in enumerate(shards):  # the ordinals sync_index gives a rebuild
        vecs = shard_vectors(lake, table, emb, s)[1]
        if len(vecs):
            train.append(vecs[::stride])
            train_ids.append(shard_ids(ordinal, len(vecs))[::stride])
    train, train_ids = np.concatenate(train), np.concatenate(train_ids)
    if len(train) < nlist:
        raise LaionAssetsError(f"{len(train)} vectors of {table} have embeddings in {emb}: too few to train {nlist} lists")
    index = faiss.index_factory(dim, f"IVF{nlist},{cfg.knn.codec}", faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10  # enough for search quality; nprobe tuning absorbs the rest
    index.train(train)
    pick = np.random.default_rng(0).choice(len(train), min(TUNING_QUERIES, len(train)), replace=False)
    return index, _Tuning(np.ascontiguousarray(train[pick]), train_ids[pick]), dim


def _collect_garbage(files: LakeFiles, manifest: dict, old: dict | None) -> None:
    """Keep the files of the new and the previous version (a reader may still use those)."""
    keep = {manifest["index"], MANIFEST, *(i["ids"] for i in manifest["shards"].values())}
    if old:
        keep |= {old["index"], *(i["ids"] for i in old["shards"].values())}
    for name in files.names() + files.names("ids"):
        if name not in keep and not name.endswith(".partial"):
            files.delete(name)
