"""Whether a lake-wide asset (the curation passes, SemDeDup, the kNN indexes, the lake summary)
is up to date, so that a plain rerun of a finished lake does nothing and says so.

Its fingerprint names what it reads: the data files of each input table (from the Delta log:
a republish or a pass writes new files, a vacuum does not), the config that decides its result,
and for the blocklist pass the list files. The asset records the fingerprint it read at its
start in `_fingerprints/lake/<path>.json` once it succeeded; it is up to date while the
current fingerprint equals that record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TypeVar

from laion_assets import __version__
from laion_assets.core.config import PipelineConfig
from laion_assets.core.curation import blocklists
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.tables import DEDUP_KEYS, IMAGES, embeddings_table, subset_table

SUMMARY = "lake_summary"
T = TypeVar("T")


def reads(lake: Lake, cfg: PipelineConfig | None, path: str) -> tuple[list[str], dict]:
    """The tables an asset reads and the config that decides its result (the summary: none)."""
    if path == SUMMARY:
        return [t for t in lake.tables() if not t.startswith("_")], {}
    passes = {k: cfg.model_dump(mode="json")[k] for k in ("curation", "subsets", "export", "knn")}  # a pass follows the exports
    if path == "curation/duplicates":
        return [DEDUP_KEYS], passes
    if path == "curation/blocked":
        location = cfg.curation.blocklists.location
        return [IMAGES], {**passes, "lists": blocklists.signature(location) if location else None}
    kind, _, subset = path.rpartition("/")
    if kind == "curation/semdedup":
        sem = next(s for s in cfg.curation.semantic if s.subset == subset)
        space = cfg.semantic_space(sem)
        return [subset_table(subset), embeddings_table(space)], {"semdedup": sem.model_dump(mode="json"), "space": cfg.embeddings.spaces[space].identity}
    if kind == "knn":
        sub = next(s for s in cfg.subsets if s.name == subset)
        space = cfg.knn_space(sub)
        return [subset_table(subset), embeddings_table(space)], {"knn": cfg.knn.model_dump(mode="json"), "space": cfg.embeddings.spaces[space].identity}
    raise ValueError(f"{path} is not a lake-wide asset")


def current(lake: Lake, cfg: PipelineConfig | None, path: str) -> str:
    tables, config = reads(lake, cfg, path)
    files = {t: sorted(u.rsplit("/", 1)[-1] for u in lake.table(t).file_uris()) if lake.exists(t) else None for t in tables}
    body = {"path": path, "code": __version__, "config": config, "files": files}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _record_path(path: str) -> str:
    return f"_fingerprints/lake/{path}.json"


def record(lake: Lake, path: str, fingerprint: str) -> None:
    """After the asset succeeded: the fingerprint it read at its start."""
    lake.put(_record_path(path), json.dumps({"fingerprint": fingerprint}).encode())


def tracked(lake: Lake, cfg: PipelineConfig | None, path: str, work: Callable[[], T]) -> T:
    """Run a lake-wide asset's `work`; once it succeeded, record what it read at its start."""
    before = current(lake, cfg, path)
    out = work()
    record(lake, path, before)
    return out


def up_to_date(lake: Lake, cfg: PipelineConfig | None, path: str) -> bool:
    data = lake.get(_record_path(path))
    try:
        return data is not None and json.loads(data)["fingerprint"] == current(lake, cfg, path)
    except (ValueError, KeyError, TypeError):
        return False
