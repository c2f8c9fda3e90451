"""What a published shard was made from, so that a rerun skips what is already up to date.

A stage's fingerprint for a shard hashes what decides its rows: the stage's code version, the
config keys that change its rows or its gate (not speed or memory knobs) and its inputs: the
upstream shards' data files (a republish always writes new files) or, for raw_urls, the source
file's size and modification time; the curation marks a subset reads, by their content (the
lake-wide passes rewrite their tables, and a pass that marks nothing new in a shard leaves its
subset as it was). Publishing a shard records its
fingerprint beside the lake's tables (`_fingerprints/<table>/<shard>.json`, with the names of
the files it published); a later run skips the stage when the recorded fingerprint equals the
current one and the shard still holds those files. Staged chunks carry the same fingerprint
without the gate thresholds, so staging made from other inputs, config or code is never reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs

from laion_assets import __version__
from laion_assets.core.config import PipelineConfig
from laion_assets.core.ingest import registry
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.tables import BLOCKED, DEDUP_KEYS, DUPLICATES

# Bump a stage's number when a code change alters the rows it publishes: its published shards
# (and their staging) are then redone by the next run.
CODE_VERSIONS = {"raw_urls": 1, "language": 1, "images": 3, "embeddings": 1, "watermark": 1, "scores": 2, "dedup_keys": 1, "subsets": 1}
MARKS = {BLOCKED: ["uid"], DUPLICATES: ["kind", "uid"]}  # what a subset reads of the curation passes' marks

# Config sections by the stage whose rows or gate they decide (None: neither). A new section
# must be placed here (a test fails until it is).
SECTIONS = {
    "ingest": "raw_urls", "download": "images", "images": "images", "embeddings": "embeddings",
    "watermark": "watermark", "scores": "scores", "subsets": "subsets", "quality": "embeddings",
    # exports keep their own fingerprint (stats.json) and are always run (an unchanged shard
    # writes nothing); the kNN index and the curation passes are lake-wide (a subset reads the
    # passes' marks of its shard, which are its inputs); the UI's settings decide no row
    "export": None, "knn": None, "curation": None, "maintenance": None, "ui": None,
}
# Keys that change speed or memory, never a row (gate thresholds are in GATES).
NOT_ROWS = {
    "download": {"concurrency", "per_host", "dns_cache_ttl_s", "chunk_rows", "max_pending_mb", "max_unstaged_rows", "min_success_rate"},
    "embeddings": {"spaces", "batch_size", "workers", "chunk_rows"},
}
# Gate thresholds: part of a published shard's fingerprint (a stricter gate redoes it) but not
# of its staging's (staged rows stay valid whatever the gate).
GATES = {
    "raw_urls": ("ingest", ["min_usable_rate"]), "images": ("download", ["min_success_rate"]),
    "embeddings": ("quality", ["embedding_norm_tolerance"]),
}


def stage_of(table: str) -> str:
    """`embeddings/b32` -> `embeddings`, `subsets/laion5b` -> `subsets`."""
    return "dedup_keys" if table == DEDUP_KEYS else table.split("/", 1)[0]


def upstream(cfg: PipelineConfig, table: str) -> list[str]:
    """The tables a stage reads for a shard (its inputs, in the asset graph's order)."""
    stage = stage_of(table)
    if stage == "images":
        return ["raw_urls", *cfg.fetch_filter_tables()]
    if stage == "language":
        return ["raw_urls"]
    space = cfg.embeddings.spaces.get(table.split("/", 1)[-1])
    if stage == "embeddings" and space is not None and space.adopted:
        return ["raw_urls"]  # published vectors beside the metadata raw_urls was read from
    if stage in ("embeddings", "watermark", "dedup_keys"):
        return ["images"]
    if stage == "scores":
        fed = sorted({f"embeddings/{cfg.head_space(h)}" for h in cfg.scores.heads})
        return fed if cfg.scores_from_adopted() else ["images", *fed]
    if stage == "subsets":
        sub = _subset(cfg, table)
        marks = ["watermark"] if cfg.watermark else []
        curation = list(MARKS)  # the lake-wide passes' marks of the shard
        return ["raw_urls", "images", "language", f"embeddings/{cfg.similarity_space(sub)}", "scores", *marks, *curation]
    return []


def config_of(cfg: PipelineConfig, table: str) -> dict:
    """The config that decides a stage's rows (files it reads are named by size and mtime)."""
    stage, name = stage_of(table), table.split("/", 1)[-1]
    if stage == "images":
        download = cfg.download.model_dump(mode="json", exclude=NOT_ROWS["download"])
        blocklists = {k: _file_id(download[k]) for k in ("url_blocklist", "image_blocklist") if download[k]}
        only = cfg.fetch_filter()  # named only when set: a lake's published images stay up to date
        download.pop("only_subset")
        return {"download": download, "blocklists": blocklists, "images": cfg.images.model_dump(mode="json"), **({"only_subset": only.rule()} if only else {})}
    if stage == "embeddings":
        space = cfg.embeddings.spaces[name]
        return {
            "embeddings": cfg.embeddings.model_dump(mode="json", exclude=NOT_ROWS["embeddings"]),
            "space": space.model_dump(mode="json", exclude={"batch_size", *(() if space.adopted else ("adopted",))}),  # as before adopted spaces
            "checkpoint": _file_id(space.checkpoint) if space.checkpoint else None,
        }
    if stage == "watermark":
        marks = cfg.watermark
        return {"watermark": marks and marks.model_dump(mode="json"), "checkpoint": _file_id(marks.checkpoint) if marks and marks.checkpoint else None}
    if stage == "language":
        from laion_assets.core.scores.language import detector_name

        return {"detector": detector_name()}
    if stage == "scores":
        heads = {h: {**c.model_dump(mode="json"), "file": _file_id(c.path), "fed": cfg.head_space(h)} for h, c in cfg.scores.heads.items()}
        return {"heads": heads, "allow_embedding_space_mismatch": cfg.scores.allow_embedding_space_mismatch}
    if stage == "dedup_keys":
        return {"dedup": cfg.curation.dedup.model_dump(mode="json")}
    if stage == "subsets":
        sub = _subset(cfg, table)
        return {"subset": sub.model_dump(mode="json", exclude={"description"}), "similarity_space": cfg.similarity_space(sub)}
    return {}


def gate_of(cfg: PipelineConfig, table: str) -> dict:
    section, keys = GATES.get(stage_of(table), (None, []))
    return {k: getattr(getattr(cfg, section), k) for k in keys}


def current(lake: Lake, cfg: PipelineConfig, table: str, shard: str, gate: bool = True, marks: bool = True) -> str | None:
    """The fingerprint a publish of `table`'s shard made now would carry (`gate=False`: without
    the gate's thresholds, the recipe of staged rows; `marks=False`: without the curation marks,
    a subset's `base`); None for a shard not registered."""
    stage = stage_of(table)
    if stage == "subsets" and _subset(cfg, table) is None:
        return None  # a rule that is not in the config (rebuilt from a recipe): nothing to skip
    if stage == "raw_urls":
        source = registry.registered(lake).get(shard)
        if source is None:
            return None
        inputs = {"source": source, "file": _file_id(source)}
    else:  # an input not materialized yet counts too: its first publish changes the fingerprint
        ups = [up for up in upstream(cfg, table) if marks or up not in MARKS]
        inputs = {up: marks_id(lake, up, shard) if up in MARKS else files_id(lake, up, shard) if lake.exists(up) else None for up in ups}
    config = config_of(cfg, table)
    if stage == "images" and (found := registry.adoption(lake, shard)):
        # adopted images are kept as img2dataset stored them, whatever the download config says
        config = {"adopted": found, "files": [_file_id(found["source"]), _file_id(found["container"])]}
    body = {"stage": stage, "code": [__version__, CODE_VERSIONS[stage]], "config": config, "inputs": inputs}
    if gate:
        body["gate"] = gate_of(cfg, table)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def files_id(lake: Lake, table: str, shard: str) -> str | None:
    """Names the data a shard holds now: the hash of its data files' names (None for the key
    index, not partitioned by shard: only its own stage or remove-shard write a shard's keys)."""
    if table == DEDUP_KEYS:
        return None
    names = sorted(uri.rsplit("/", 1)[-1] for uri in lake.shard_files(table, shard))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:24]


def marks_id(lake: Lake, table: str, shard: str) -> str:
    """Names the curation marks of a shard by content (no table yet: no marks)."""
    rows = b""
    if lake.exists(table):
        marks = lake.scan(table).filter(pl.col("shard") == shard).select(MARKS[table]).unique().sort(MARKS[table]).collect()
        rows = marks.write_csv().encode() if marks.height else b""
    return hashlib.sha256(rows).hexdigest()[:24]


@dataclass(frozen=True)
class Record:
    fingerprint: str
    files: str  # files_id of the shard right after the publish
    version: int
    recorded_at: float
    recipe: str | None = None  # of the staged rows it was published from
    base: str | None = None  # a subset's fingerprint without the curation marks


def _path(table: str, shard: str) -> str:
    return f"_fingerprints/{table}/{shard}.json"


def record(lake: Lake, table: str, shard: str, fingerprint: str | None, version: int, recipe: str | None = None, base: str | None = None) -> None:
    """After a publish: what the shard was made from and which files hold it."""
    if fingerprint is None:
        return
    rec = Record(fingerprint, files_id(lake, table, shard), version, time.time(), recipe, base)
    lake.put(_path(table, shard), json.dumps(rec.__dict__).encode())


def recorded(lake: Lake, table: str, shard: str) -> Record | None:
    data = lake.get(_path(table, shard))
    if data is None:
        return None
    try:
        return Record(**json.loads(data))
    except (ValueError, TypeError):
        return None  # unreadable: as if never recorded, so the stage is redone


def up_to_date(lake: Lake, table: str, shard: str, fingerprint: str | None) -> Record | None:
    """The record of the shard's publish when it was made from `fingerprint` and the shard
    still holds exactly the files that publish wrote; else None (the stage must run)."""
    if fingerprint is None or not lake.exists(table):
        return None
    rec = recorded(lake, table, shard)
    if rec is None or rec.fingerprint != fingerprint or rec.files != files_id(lake, table, shard):
        return None
    return rec


def after_pass(lake: Lake, cfg: PipelineConfig, table: str, shards: list[str]) -> int:
    """After a curation pass changed the marks of `shards` and took the marked rows out of the
    subset `table` itself: record those subset shards as up to date with the new marks, when
    they were made from everything else as it is now (their `base`). Otherwise the next run
    would redo every subset a pass touched. Returns how many were recorded."""
    if not lake.exists(table):
        return 0
    version, done = lake.table(table).version(), 0
    for shard in shards:
        rec = recorded(lake, table, shard)
        if rec is not None and rec.base is not None and rec.base == current(lake, cfg, table, shard, marks=False):
            record(lake, table, shard, current(lake, cfg, table, shard), version, rec.recipe, rec.base)
            done += 1
    return done


def _shards(lake: Lake, table: str) -> list[str]:
    if table == DEDUP_KEYS:  # partitioned by bucket
        return sorted(lake.scan(table).select("shard").unique().collect()["shard"].to_list())
    return sorted({p["shard"] for p in lake.table(table).partitions()})


def _subset(cfg: PipelineConfig, table: str):
    return next((s for s in cfg.subsets if f"subsets/{s.name}" == table), None)


def _file_id(path: str) -> list:
    """A file named by URI, size and modification time (what make and rsync compare)."""
    local = "://" not in path or path.startswith("file://")
    fs, p = pafs.FileSystem.from_uri(Path(path.removeprefix("file://")).resolve().as_uri() if local else path)
    info = fs.get_file_info(p)
    return [path, info.size, info.mtime_ns]


def adopt(lake: Lake, cfg: PipelineConfig, table: str) -> int:
    """Record every published shard of `table` as made from the current fingerprint, without
    recomputing it: for tables moved rather than made (migrate-embeddings). Returns the shards."""
    shards = _shards(lake, table) if lake.exists(table) else []
    version = lake.table(table).version() if shards else 0
    recorded_n = 0
    for shard in shards:
        fingerprint = current(lake, cfg, table, shard)  # None: a subset the config no longer has
        record(lake, table, shard, fingerprint, version)
        recorded_n += fingerprint is not None
    return recorded_n


def plan(lake: Lake, cfg: PipelineConfig, tables: list[str], shard: str, redo: set[str] = frozenset()) -> dict[str, Record | None]:
    """For each of `tables` (in the asset graph's order): the record of its publish when it is
    up to date for `shard` and can be skipped, else None (it runs). A stage runs when it is in
    `redo` (--force), keeps no fingerprint (the webdataset export), was never published, its
    inputs, config or code changed, or a stage it reads runs before it in this plan."""
    out: dict[str, Record | None] = {}
    for table in tables:
        runs_before = any(out.get(up, "absent") is None for up in upstream(cfg, table))
        known = stage_of(table) in CODE_VERSIONS  # a stage without a fingerprint always runs
        out[table] = None if table in redo or runs_before or not known else up_to_date(lake, table, shard, current(lake, cfg, table, shard))
    return out
