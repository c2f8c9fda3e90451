"""Hash blocklists, Re-LAION style: named lists of MD5 / SHA-1 / SHA-256 digests of image
bytes, or of URLs (plain, or their MD5 / SHA-1 / SHA-256), matched against the whole lake.

A list is a file `<name>.<kind>.txt` in the configured location (a folder or an s3:// prefix):
one entry a line, `#` starts a comment, and a `# source: ...` line says where it came from.
Each pass marks every matching row (`curation/blocked`, including rows materialized before the
list arrived), publishes what changed per list and shard as a diff (`curation/blocklist_diff`
and a parquet + CSV file per pass) so a user of an older export can clean their copy, and
takes the newly blocked rows out of every published subset (a new Delta version of each).
A pass checks changed lists against every shard and unchanged lists only against the shards
whose images changed since the previous pass.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

from laion_assets.core.curation import passes
from laion_assets.core.curation.dedup import normalize_url
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.lake.tables import BLOCKED, IMAGES

DIFF, DIFF_FILES = "curation/blocklist_diff", "curation/blocklist_diffs"
IMAGE_KINDS = ("md5", "sha1", "sha256")  # digests of the original image bytes (images columns)
URL_KINDS = ("url", "url_md5", "url_sha1", "url_sha256")
LIST_FILE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9_-]*)\.(?P<kind>" + "|".join(IMAGE_KINDS + URL_KINDS) + r")\.txt$")
HEX_LEN = {"md5": 32, "sha1": 40, "sha256": 64}
BLOCKED_SCHEMA = {"list": pl.String, "kind": pl.String, "shard": pl.String, "uid": pl.Int64, "url": pl.String, "matched": pl.String}


@dataclass(frozen=True)
class Blocklist:
    name: str
    kind: str
    source: str
    entries: frozenset[str] = field(repr=False)
    fingerprint: str = ""


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def list_files(location: str) -> list[pafs.FileInfo]:
    """The list files in `location` (other files are ignored: a README may sit beside them)."""
    fs, root = _filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File and LIST_FILE.match(i.base_name)), key=lambda i: i.base_name)


def signature(location: str) -> str:
    """Names, sizes and modification times of the list files: cheap, for the sensor."""
    return hashlib.sha256(repr([(i.base_name, i.size, i.mtime_ns) for i in list_files(location)]).encode()).hexdigest()[:16]


def parse(name: str, kind: str, text: str) -> Blocklist:
    source, entries = "", set()
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().lower().startswith("# source:"):
            source = line.split(":", 1)[1].strip()
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if kind in HEX_LEN or kind.startswith("url_"):
            entry = entry.lower()
            want = HEX_LEN[kind.removeprefix("url_")]
            if len(entry) != want or not re.fullmatch(r"[0-9a-f]+", entry):
                raise LaionAssetsError(f"blocklist {name}.{kind}.txt line {n}: not a {kind} hex digest ({want} hex digits): {entry[:80]!r}")
        entries.add(entry)
    if kind == "url":
        entries = set(pl.select(normalize_url(pl.Series(sorted(entries), dtype=pl.String))).to_series().to_list())
    fingerprint = hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]
    return Blocklist(name, kind, source, frozenset(entries), fingerprint)


def read_lists(location: str | None) -> list[Blocklist]:
    if not location:
        return []
    fs, _ = _filesystem(location)
    lists: list[Blocklist] = []
    for info in list_files(location):
        m = LIST_FILE.match(info.base_name)
        if any(bl.name == m["name"] for bl in lists):
            raise LaionAssetsError(f"two blocklists named '{m['name']}' in {location}: give each list file its own name")
        with fs.open_input_stream(info.path, compression=None) as f:
            lists.append(parse(m["name"], m["kind"], f.read().decode("utf-8", errors="replace")))
    return lists


def _hash_urls(urls: pl.Series, algo: str) -> pl.Series:
    return pl.Series([hashlib.new(algo, u.encode()).hexdigest() if u is not None else None for u in urls], dtype=pl.String)


def matches(lake: Lake, lists: list[Blocklist], shards: list[str] | None, version: int) -> pl.DataFrame:
    """Rows of the images table (at `version`; only `shards` when given) matching each list."""
    empty = pl.DataFrame(schema=BLOCKED_SCHEMA)
    if not lists:
        return empty
    names = passes.table_columns(lake, IMAGES)
    lf = pl.scan_delta(lake.table_uri(IMAGES), version=version, storage_options=lake.storage_options)
    if shards is not None:
        lf = lf.filter(pl.col("shard").is_in(shards))
    lf = lf.select("shard", "uid", "url", *[pl.col(k) if k in names else pl.lit(None, pl.String).alias(k) for k in IMAGE_KINDS])
    rows = lf.collect(engine="streaming")
    found = [empty]
    for bl in lists:
        if bl.kind in IMAGE_KINDS:
            value = rows[bl.kind]
        elif bl.kind == "url":
            value = rows.select(normalize_url(pl.col("url"))).to_series()
        else:
            value = _hash_urls(rows["url"], bl.kind.removeprefix("url_"))
        hit = rows.with_columns(matched=value).filter(pl.col("matched").is_in(list(bl.entries)))
        found.append(hit.select(pl.lit(bl.name).alias("list"), pl.lit(bl.kind).alias("kind"), "shard", "uid", "url", "matched"))
    return pl.concat(found)


def changed_shards(lake: Lake, table: str, since: int) -> list[str] | None:
    """Shards whose files differ between version `since` and now (from the Delta log: works
    after the old files were vacuumed); None when that version is gone."""
    def files(dt) -> set[tuple[str, str]]:
        acts = pl.from_arrow(pa.table(dt.get_add_actions(flatten=True)))
        return set(zip(acts["path"].to_list(), acts["partition.shard"].to_list())) if acts.height else set()

    try:
        old = files(DeltaTable(lake.table_uri(table), version=since, storage_options=lake.storage_options))
    except Exception:
        return None
    return sorted({shard for _, shard in old ^ files(lake.table(table))})


@dataclass
class BlockPass:
    mode: str  # full | incremental | unchanged | empty
    version: int | None = None
    lists: list[Blocklist] = field(default_factory=list)
    shards_checked: list[str] | None = None
    blocked: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=BLOCKED_SCHEMA))
    diff: pl.DataFrame = field(default_factory=pl.DataFrame)
    diff_files: list[str] = field(default_factory=list)


def run_pass(lake: Lake, location: str | None) -> BlockPass:
    """Bring `curation/blocked` up to date with the lists and the images; publish the diff."""
    lists = read_lists(location)
    if not lake.exists(IMAGES):
        return BlockPass("empty", lists=lists)
    images_now = lake.table(IMAGES).version()
    state = passes.last_state(lake, BLOCKED) or {}
    prints = {bl.name: bl.fingerprint for bl in lists}
    if state.get("lists") == prints and state.get("images_version") == images_now:
        return BlockPass("unchanged", lake.table(BLOCKED).version(), lists, [], _current(lake))
    shards = changed_shards(lake, IMAGES, state["images_version"]) if "images_version" in state else None
    same = [bl for bl in lists if state.get("lists", {}).get(bl.name) == bl.fingerprint]
    fresh = [bl for bl in lists if bl not in same]
    old = _current(lake)
    keep = old.filter(pl.col("list").is_in([bl.name for bl in same]))
    if shards is None:  # no usable state: every list against every shard
        fresh, same, keep = lists, [], old.clear()
    else:
        keep = keep.filter(~pl.col("shard").is_in(shards))
    new = pl.concat([keep, matches(lake, fresh, None, images_now), matches(lake, same, shards, images_now)]).unique(["list", "shard", "uid"]).sort("list", "shard", "uid")
    key = ["list", "shard", "uid"]
    removed = new.join(old, on=key, how="anti").with_columns(change=pl.lit("removed"))
    restored = old.join(new, on=key, how="anti").with_columns(change=pl.lit("restored"))
    state = {"lists": prints, "images_version": images_now}
    version = passes.write(lake, BLOCKED, new.to_arrow(), mode="overwrite", partition_by=["shard"], state=state)
    sources = {bl.name: bl.source for bl in lists}
    diff = pl.concat([removed, restored]).with_columns(
        pl.lit(version, pl.Int64).alias("pass_version"), pl.col("list").replace_strict(sources, default="", return_dtype=pl.String).alias("source"),
    ).select("pass_version", "list", "source", "kind", "change", "shard", "uid", "url", "matched")
    files = []
    if diff.height:
        passes.write(lake, DIFF, diff.to_arrow(), mode="append", partition_by=["list"], metadata={"pass": str(version)})
        files = write_diff_files(lake, diff, version)
    return BlockPass("full" if shards is None else "incremental", version, lists, shards if shards is not None else None, new, diff, files)


def _current(lake: Lake) -> pl.DataFrame:
    if not lake.exists(BLOCKED):
        return pl.DataFrame(schema=BLOCKED_SCHEMA)
    return lake.scan(BLOCKED).select(list(BLOCKED_SCHEMA)).collect()


def write_diff_files(lake: Lake, diff: pl.DataFrame, version: int) -> list[str]:
    """The pass's diff as parquet and CSV beside the tables, for users outside Delta."""
    table = diff.to_arrow()
    root = lake.table_uri(DIFF_FILES)
    fs, path = _filesystem(root)
    fs.create_dir(path, recursive=True)
    out = []
    for ext in ("parquet", "csv"):
        target = f"{path}/pass-{version:06d}.{ext}"
        if ext == "parquet":
            pq.write_table(table, target, filesystem=fs, compression="zstd")
        else:
            buf = io.BytesIO()
            pacsv.write_csv(table, buf)
            with fs.open_output_stream(target) as f:
                f.write(buf.getvalue())
        out.append(f"{root}/pass-{version:06d}.{ext}")
    return out
