"""Search a subset by text or image: the query goes through the CLIP towers of the space the
subset's kNN index was built in (the model its manifest names; a pipeline config may stand in
for it), the index (memory-mapped) gives ids, the id mapping gives uid, url and caption.
Thumbnails are the images table's stored bytes."""

from __future__ import annotations

import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from laion_assets.core.embeddings.config import SpaceConfig
from laion_assets.core.exports import freshness
from laion_assets.core.exports.knn import HIT_COLUMNS, MANIFEST, ROW_BITS, index_folder
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.lake.files import LakeFiles
from laion_assets.core.lake.tables import IMAGES

if TYPE_CHECKING:  # a search needs no pipeline config: the index names its model
    from laion_assets.core.config import PipelineConfig

CACHE = Path(tempfile.gettempdir()) / "laion-assets-knn"  # local copies of object-store indexes
MAX_CANDIDATES = 10_000  # most hits asked of the index to fill k after collapsing and filtering


@dataclass
class Hit:
    rank: int
    score: float
    uid: int
    url: str
    caption: str | None
    shard: str
    subset: str
    id: int = -1  # the index's id (shard ordinal << 32 | row): what clip-retrieval's /metadata takes
    sha256: str | None = None
    scores: dict = field(default_factory=dict)  # the subset's punsafe, aesthetic... as indexed
    copies: int = 0  # further hits of the same image (sha256) collapsed into this one


class SubsetIndex:
    """One subset's index, read memory-mapped (faiss IO_FLAG_MMAP: the inverted lists of an
    IVF index, the codes of a flat one stay on disk and in the page cache), and its id mapping
    (Arrow IPC files, memory-mapped)."""

    def __init__(self, lake: Lake, subset: str):
        import faiss

        self.subset = subset
        self.files = LakeFiles(lake, index_folder(subset))
        self.manifest = m = self.files.read_json(MANIFEST)
        if m is None:
            raise LaionAssetsError(f"subset '{subset}' has no kNN index in {lake.uri}: materialize its index (asset knn_{subset}) first")
        freshness.refuse_stale_index(lake, subset)  # never show rows the subset no longer has
        self.cache = CACHE / lake.uri.replace("/", "_").replace(":", "")
        mmap = faiss.IO_FLAG_MMAP if m["kind"] == "ivf" else faiss.IO_FLAG_MMAP_IFC
        self.index = faiss.read_index(self.files.local_path(m["index"], self.cache), mmap | faiss.IO_FLAG_READ_ONLY)
        if m["nprobe"]:
            self.index.nprobe = m["nprobe"]
        self.shards = {info["ordinal"]: (shard, info["ids"]) for shard, info in m["shards"].items()}
        self._ids: dict[int, pa.Table] = {}

    @property
    def version(self) -> int:
        return self.manifest["version"]

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        scores, ids = self.index.search(np.ascontiguousarray(queries, np.float32).reshape(-1, self.manifest["dim"]), k)
        return [
            [self._hit(rank, float(score), int(i)) for rank, (score, i) in enumerate(zip(row_s, row_i), 1) if i >= 0]
            for row_s, row_i in zip(scores, ids)
        ]

    def _hit(self, rank: int, score: float, id_: int) -> Hit:
        shard, rec = self.record(id_)
        scores = {c: rec[c] for c in HIT_COLUMNS if c != "sha256" and c in rec}
        return Hit(rank, round(score, 4), rec["uid"], rec["url"], rec["caption"], shard, self.subset, id_, rec.get("sha256"), scores)

    def record(self, id_: int) -> tuple[str, dict]:
        """The shard and id-mapping row (uid, url, caption, HIT_COLUMNS) of an index id."""
        ordinal, row = id_ >> ROW_BITS, id_ & ((1 << ROW_BITS) - 1)
        if ordinal not in self.shards:
            raise LaionAssetsError(f"id {id_} is not in the {self.subset} index (version {self.version})")
        shard, name = self.shards[ordinal]
        if ordinal not in self._ids:
            source = pa.memory_map(self.files.local_path(name, self.cache))
            self._ids[ordinal] = pa.ipc.open_file(source).read_all()
        if row >= self._ids[ordinal].num_rows:
            raise LaionAssetsError(f"id {id_} is not in the {self.subset} index (version {self.version})")
        return shard, self._ids[ordinal].slice(row, 1).to_pylist()[0]


class QueryEncoder:
    """The CLIP text and image towers of one space, loaded on first use."""

    def __init__(self, space: SpaceConfig, device: str = "auto", precision: str = "auto"):
        self.space, self.device, self.precision = space, device, precision
        self._encoder = None
        self._lock = threading.Lock()

    def encoder(self):
        with self._lock:
            if self._encoder is None:
                from laion_assets.core.embeddings.clip import load_model
                from laion_assets.core.embeddings.encoder import Encoder

                self._encoder = Encoder([load_model(self.space, self.device, self.precision)], batch_size=1, workers=1, text_batch_size=1)
            return self._encoder

    def __call__(self, text: str | None = None, image: bytes | None = None) -> np.ndarray:
        """One unit query vector: the text's, the image's, or the normalised sum of both."""
        if not text and not image:
            raise LaionAssetsError("give a text query, an image, or both")
        parts = []
        if text:
            parts.append(self.encoder().texts([text])[0])
        if image:
            try:
                parts.append(self.encoder().images([image])[0])
            except Exception as e:
                raise LaionAssetsError(f"the query image could not be decoded ({type(e).__name__}): give a jpg, png or webp file") from None
        v = np.sum(parts, axis=0)
        return v / max(float(np.linalg.norm(v)), 1e-12)


class Searcher:
    """What `laion-assets search` and `serve` use: the indexes of the lake's subsets (reopened
    when a new index version is published), query encoders per space, thumbnails. The query
    model is the one each index's manifest names; `cfg`, when given, overrides it (its space of
    that name must be the same model, e.g. to point at a checkpoint that has moved)."""

    def __init__(self, lake: Lake, cfg: PipelineConfig | None = None, device: str = "auto"):
        self.lake, self.cfg, self.device = lake, cfg, device
        self._indexes: dict[str, tuple[float, SubsetIndex]] = {}
        self._encoders: dict[SpaceConfig, QueryEncoder] = {}
        self._lock = threading.Lock()
        self.thumbnails = Thumbnails(lake)

    def subsets(self) -> list[str]:
        """The subsets of the lake that have an index."""
        root = LakeFiles(self.lake, index_folder())
        return [name for name in root.folders() if LakeFiles(self.lake, index_folder(name)).exists(MANIFEST)]

    def index(self, subset: str | None = None) -> SubsetIndex:
        subset = subset or next(iter(self.subsets()), None)
        if subset is None:
            raise LaionAssetsError(f"no subset of lake {self.lake.uri} has a kNN index yet: materialize a subset's index (asset knn_<subset>) first")
        with self._lock:
            checked, idx = self._indexes.get(subset, (0.0, None))
            if idx is None or time.monotonic() - checked > 2:
                current = LakeFiles(self.lake, index_folder(subset)).read_json(MANIFEST)
                if idx is None or (current and current["version"] != idx.version):
                    idx = SubsetIndex(self.lake, subset)
                self._indexes[subset] = (time.monotonic(), idx)
            return idx

    def encoder(self, idx: SubsetIndex) -> QueryEncoder:
        space, built_in = idx.manifest["space"], idx.manifest["settings"]["embedding_space"]
        if self.cfg is not None:
            model, precision = self.cfg.embeddings.spaces.get(space), self.cfg.embeddings.precision
            if model is None or model.identity != built_in:
                raise LaionAssetsError(
                    f"the {idx.subset} index holds {built_in} vectors (space {space}) but the config's space {space} is "
                    f"{model.identity if model else 'missing'}: use the config the index was built with, or none"
                )
        elif "query_model" in idx.manifest:
            model, precision = SpaceConfig(**idx.manifest["query_model"]), "auto"
        else:
            raise LaionAssetsError(
                f"the {idx.subset} index does not name its query model (it predates that): give the config it was "
                f"built with (--config), or materialize knn_{idx.subset} again to record it"
            )
        with self._lock:
            return self._encoders.setdefault(model, QueryEncoder(model, self.device, precision))

    def warm_up(self) -> list[str]:
        """Open every index and load its query model now, not on the first query."""
        names = self.subsets()
        for name in names:
            self.encoder(self.index(name)).encoder()
        return names

    def search(self, text: str | None = None, image: bytes | None = None, subset: str | None = None, k: int = 10,
               deduplicate: bool = True) -> list[Hit]:
        """The k nearest images; hits of one image (same sha256) are collapsed into the first
        unless `deduplicate` is off."""
        check_k(k)
        idx = self.index(subset)
        return nearest(idx, self.encoder(idx)(text, image), k, deduplicate)


def check_k(k: int) -> None:
    if not 1 <= k <= 1000:
        raise LaionAssetsError(f"k must be between 1 and 1000, got {k}")


def nearest(idx: SubsetIndex, query: np.ndarray, k: int, deduplicate: bool = True, keep=None) -> list[Hit]:
    """The k nearest hits that `keep` accepts, one per image (sha256) when `deduplicate`: the
    index is asked for more candidates (up to MAX_CANDIDATES) until k are found."""
    fetch, most = (k if not deduplicate and keep is None else 2 * k), min(MAX_CANDIDATES, max(1, idx.index.ntotal))
    while True:
        fetch = min(fetch, most)
        hits = idx.search(query[None, :], fetch)[0]
        chosen: list[Hit] = []
        first: dict[str, Hit] = {}
        for hit in hits:
            if keep is not None and not keep(hit):
                continue
            if deduplicate and hit.sha256 is not None:
                if hit.sha256 in first:
                    first[hit.sha256].copies += 1
                    continue
                first[hit.sha256] = hit
            chosen.append(hit)
        if len(chosen) >= k or fetch >= most:
            return [replace(hit, rank=rank) for rank, hit in enumerate(chosen[:k], 1)]
        fetch *= 4


class Thumbnails:
    """Stored image bytes by (shard, uid), read from the images table one row group at a time:
    the uid column of a shard's files locates a row, then only its row group's images are read
    (a few recent row groups are kept)."""

    def __init__(self, lake: Lake, groups: int = 4):
        self.lake = lake
        self._where: dict[str, tuple[list[str], dict[int, tuple[str, int, int]]]] = {}
        self._groups: OrderedDict = OrderedDict()
        self._keep = groups
        self._lock = threading.Lock()

    def get(self, shard: str, uid: int) -> bytes | None:
        import pyarrow.parquet as pq

        with self._lock:
            where = self._locate(shard).get(uid)
            if where is None:
                return None
            path, group, row = where
            if (path, group) not in self._groups:
                fs, _ = self.lake._filesystem(IMAGES)
                with fs.open_input_file(path) as f:
                    self._groups[(path, group)] = pq.ParquetFile(f).read_row_group(group, columns=["image"])["image"]
                while len(self._groups) > self._keep:
                    self._groups.popitem(last=False)
            self._groups.move_to_end((path, group))
            return self._groups[(path, group)][row].as_py()

    def _locate(self, shard: str) -> dict[int, tuple[str, int, int]]:
        import pyarrow.parquet as pq

        if not self.lake.exists(IMAGES):
            return {}
        files = [u if self.lake.is_local else u.split("://", 1)[1] for u in self.lake.shard_files(IMAGES, shard)]
        known = self._where.get(shard)
        if known and known[0] == files:
            return known[1]
        fs, _ = self.lake._filesystem(IMAGES)
        where = {}
        for path in files:
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                for group in range(pf.num_row_groups):
                    for row, uid in enumerate(pf.read_row_group(group, columns=["uid"])["uid"].to_pylist()):
                        where[uid] = (path, group, row)
        self._where[shard] = (files, where)
        return where
