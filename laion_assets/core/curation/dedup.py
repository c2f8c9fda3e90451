"""Lake-wide exact and perceptual duplicates, computed incrementally.

The key index (`curation/dedup_keys`) holds, for every stored image (status success), one
entry per key: its normalised URL, the sha256 of its bytes, and d+1 bands of its 64-bit pHash
(two pHashes within Hamming distance d agree exactly on at least one band, so the bands find
every candidate pair). Keys are 16-byte digests; entries are partitioned by a hash bucket of the
key, so every group of equal keys lives in one bucket: the unit of work, in memory and across
machines. A shard replaces its own entries in one Delta commit (concurrent shard runs conflict
only on the same shard, and Delta's retry keeps exactly one copy).

The marks (`curation/duplicates`) are a function of the index alone, so the order and the
concurrency in which shards were materialized do not matter, and a re-materialized shard keeps
its survivors: a row is a duplicate when a row with a smaller (shard, uid) has the same key
(url, sha256) or a pHash within the distance (phash); it is marked with the smallest such row.
The lake-wide pass recomputes marks only for the key groups the shards changed since its last
run touched (the index's Delta history says which shards), never rescanning the shards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from laion_assets.core.curation import passes
from laion_assets.core.curation.config import DedupConfig
from laion_assets.core.lake.delta import Lake, check_shard_key
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.lake.tables import DEDUP_KEYS, DUPLICATES, IMAGES

INDEX = DEDUP_KEYS
KINDS = ("url", "sha256", "phash")
INDEX_SCHEMA = pa.schema([
    ("bucket", pa.int32()), ("kind", pa.string()), ("key", pa.binary()), ("uid", pa.int64()),
    ("phash", pa.int64()), ("shard", pa.string()),
])
MARKS_SCHEMA = pa.schema([
    ("kind", pa.string()), ("uid", pa.int64()), ("duplicate_of_shard", pa.string()),
    ("duplicate_of", pa.int64()), ("distance", pa.int32()), ("shard", pa.string()),
])
# Maintenance commits change files, not rows.
NO_CHANGE = {"OPTIMIZE", "VACUUM START", "VACUUM END", "CREATE TABLE"}


def layout(cfg: DedupConfig) -> str:
    """What the index entries depend on: a different layout needs the index built again."""
    return f"buckets={cfg.buckets} phash_bands={cfg.phash_distance + 1}"


def normalize_url(url: pl.Expr) -> pl.Expr:
    """Same resource, same key: scheme and host lower-cased, default port and fragment
    dropped, '/' for an empty path; the path and query are kept as they are."""
    s = url.str.strip_chars().str.replace(r"#.*$", "")
    head = s.str.extract(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)", 1)
    rest = s.str.slice(head.str.len_chars())
    head = head.str.to_lowercase().str.replace(r"^(http://[^/]*):80$", "$1").str.replace(r"^(https://[^/]*):443$", "$1")
    rest = pl.when(rest.str.starts_with("/")).then(rest).otherwise(pl.lit("/") + rest)
    return pl.when(head.is_null()).then(s).otherwise(head + rest)


def bands(distance: int) -> list[tuple[int, int]]:
    """distance+1 bit ranges covering the 64 bits of a pHash (pigeonhole: hashes within the
    distance share one range exactly)."""
    m = distance + 1
    bounds = [64 * i // m for i in range(m + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def phash_bits(hexes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hexes], dtype=np.uint64)


def band_keys(values: np.ndarray, cfg: DedupConfig) -> pl.DataFrame:
    """bucket, key (band number + band value, 9 bytes) and phash (signed) of every band of
    every pHash in `values` (uint64): vectorised, no per-row Python."""
    frames = []
    for i, (lo, hi) in enumerate(bands(cfg.phash_distance)):
        part = (values >> np.uint64(64 - hi)) & np.uint64((1 << (hi - lo)) - 1)
        raw = np.empty(len(values), dtype=[("band", "u1"), ("value", ">u8")])
        raw["band"], raw["value"] = i, part
        key = pa.FixedSizeBinaryArray.from_buffers(pa.binary(9), len(values), [None, pa.py_buffer(raw.tobytes())])
        with np.errstate(over="ignore"):  # splitmix64 finaliser: a uniform bucket from (band, value)
            h = (part + np.uint64(i + 1)) * np.uint64(0x9E3779B97F4A7C15)
            h = (h ^ (h >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(29)
        frames.append(pl.DataFrame({
            "bucket": pl.Series((h % np.uint64(cfg.buckets)).astype(np.int32)), "key": pl.from_arrow(key.cast(pa.binary())),
            "phash": pl.Series(values.view(np.int64)),
        }))
    return pl.concat(frames) if frames else pl.DataFrame(schema={"bucket": pl.Int32, "key": pl.Binary, "phash": pl.Int64})


def _digest_bucket(keys: list[bytes], buckets: int) -> np.ndarray:
    if not keys:
        return np.zeros(0, np.int32)
    head = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16)[:, :4].copy().view(">u4").ravel()
    return (head % buckets).astype(np.int32)


def index_entries(rows: pl.DataFrame, cfg: DedupConfig) -> pa.Table:
    """The index entries of a shard's rows (uid, url, status, sha256, phash): stored images only,
    since a row that is not stored cannot be a survivor."""
    rows = rows.filter(pl.col("status") == "success")
    parts = []

    def exact(kind: str, uids: pl.Series, keys: list[bytes]) -> pl.DataFrame:
        return pl.DataFrame({
            "bucket": pl.Series(_digest_bucket(keys, cfg.buckets), dtype=pl.Int32), "kind": pl.Series([kind] * len(keys), dtype=pl.String),
            "key": pl.Series(keys, dtype=pl.Binary), "uid": uids, "phash": pl.Series([None] * len(keys), dtype=pl.Int64),
        })

    urls = rows.select("uid", norm=normalize_url(pl.col("url")))
    parts.append(exact("url", urls["uid"], [hashlib.sha256(u.encode()).digest()[:16] for u in urls["norm"]]))
    sha = rows.filter(pl.col("sha256").is_not_null())
    parts.append(exact("sha256", sha["uid"], [bytes.fromhex(h)[:16] for h in sha["sha256"]]))
    ph = rows.filter(pl.col("phash").is_not_null())
    values = phash_bits(ph["phash"].to_list())
    bands_of = band_keys(values, cfg).with_columns(
        kind=pl.lit("phash"), uid=pl.concat([ph["uid"]] * len(bands(cfg.phash_distance))) if ph.height else pl.Series([], dtype=pl.Int64),
    )
    parts.append(bands_of.select("bucket", "kind", "key", "uid", "phash"))
    return pl.concat(parts).to_arrow().cast(INDEX_SCHEMA.remove(INDEX_SCHEMA.get_field_index("shard")))


def _check_layout(lake: Lake, cfg: DedupConfig) -> None:
    if not lake.exists(INDEX):
        return
    found = (lake.table(INDEX).metadata().description or "").removeprefix("layout ")
    if found != layout(cfg):
        raise LaionAssetsError(
            f"the dedup index was built with {found} but curation.dedup now gives {layout(cfg)}: "
            f"delete {lake.table_uri(INDEX)} and re-materialize curation/dedup_keys for every shard"
        )


def images_columns(lake: Lake, shard: str, columns: list[str]) -> pl.DataFrame:
    """A shard's image rows; columns added to the images table later (md5, sha1, phash) are
    null in shards published before them (unknown: re-materialize images to fill them)."""
    names = passes.table_columns(lake, IMAGES)
    df = lake.read_shard(IMAGES, shard, [c for c in columns if c in names])
    return df.with_columns(pl.lit(None, pl.String).alias(c) for c in columns if c not in names)


def update_index(lake: Lake, shard: str, cfg: DedupConfig) -> dict:
    """Replace `shard`'s entries in the key index (one commit; the pass marks duplicates)."""
    check_shard_key(shard)
    _check_layout(lake, cfg)
    rows = images_columns(lake, shard, ["uid", "url", "status", "sha256", "phash"])
    entries = index_entries(rows, cfg)
    entries = entries.append_column("shard", pa.array([shard] * entries.num_rows, pa.string()))
    version = passes.write(
        lake, INDEX, entries, mode="overwrite", predicate=f"shard = '{shard}'", partition_by=["bucket"],
        metadata={"shard": shard, "layout": layout(cfg)}, description=f"layout {layout(cfg)}",
    )
    per_kind = dict(pl.from_arrow(entries).group_by("kind").len().sort("kind").iter_rows())
    stored = rows.filter(pl.col("status") == "success")
    return {
        "index_version": version, "entries": entries.num_rows, "entries_per_kind": per_kind,
        "stored_rows": stored.height, "rows_without_phash": stored.filter(pl.col("phash").is_null()).height,
    }


# -- the lake-wide pass --------------------------------------------------------------------

def _before(shard_a: pl.Expr, uid_a: pl.Expr, shard_b: pl.Expr, uid_b: pl.Expr) -> pl.Expr:
    """(shard_a, uid_a) < (shard_b, uid_b): shard keys as strings, then uids."""
    return (shard_a < shard_b) | ((shard_a == shard_b) & (uid_a < uid_b))


def _smallest(df: pl.DataFrame, by: list[str], shard: str, uid: str) -> pl.DataFrame:
    return df.sort(shard, uid).group_by(by, maintain_order=True).first()


def exact_candidates(groups: pl.DataFrame) -> pl.DataFrame:
    """For every row of complete url/sha256 key groups: the group's survivor, when it is another
    row (O(rows), however large a group: a placeholder image can have millions of copies)."""
    first = _smallest(groups.select("kind", "key", "shard", "uid"), ["kind", "key"], "shard", "uid")
    return (
        groups.select("kind", "key", "shard", "uid")
        .join(first.rename({"shard": "duplicate_of_shard", "uid": "duplicate_of"}), on=["kind", "key"])
        .filter(_before(pl.col("duplicate_of_shard"), pl.col("duplicate_of"), pl.col("shard"), pl.col("uid")))
        .select("kind", "shard", "uid", "duplicate_of_shard", "duplicate_of", distance=pl.lit(0, pl.Int32))
    )


def phash_candidates(groups: pl.DataFrame, rows: pl.DataFrame | None, distance: int) -> pl.DataFrame:
    """For the rows of complete pHash band groups (all of them, or `rows`): the smallest row
    before them whose pHash is within `distance`. Pairs are formed between distinct hash values
    only, each standing for its smallest row, so a thousand copies of one blank image cost one."""
    groups = groups.select("key", "shard", "uid", "phash")
    left = groups.select("shard", "uid", "phash").unique()
    if rows is not None:
        left = left.join(rows, on=["shard", "uid"], how="semi")
    reps = _smallest(groups.select("phash", "shard", "uid"), ["phash"], "shard", "uid")
    values = groups.select("key", "phash").unique().join(reps, on="phash")
    wanted = values.join(left.select("phash").unique(), on="phash", how="semi").select("key", "phash")
    near = (
        wanted.join(values.rename({"phash": "phash_o", "shard": "shard_o", "uid": "uid_o"}), on="key")
        .filter(pl.col("phash") != pl.col("phash_o"))
        .with_columns(distance=pl.col("phash").xor(pl.col("phash_o")).bitwise_count_ones().cast(pl.Int32))
        .filter(pl.col("distance") <= distance)
        .select("phash", duplicate_of_shard="shard_o", duplicate_of="uid_o", distance="distance")
    )
    same = reps.select("phash", duplicate_of_shard="shard", duplicate_of="uid", distance=pl.lit(0, pl.Int32))
    return (
        left.join(pl.concat([same, near]), on="phash")
        .filter(_before(pl.col("duplicate_of_shard"), pl.col("duplicate_of"), pl.col("shard"), pl.col("uid")))
        .select(pl.lit("phash").alias("kind"), "shard", "uid", "duplicate_of_shard", "duplicate_of", "distance")
    )


def reduce_marks(candidates: list[pl.DataFrame]) -> pl.DataFrame:
    """Each row's mark: the smallest of its candidates (a pHash's bands land in several buckets)."""
    empty = pl.DataFrame(schema={
        "kind": pl.String, "shard": pl.String, "uid": pl.Int64, "duplicate_of_shard": pl.String,
        "duplicate_of": pl.Int64, "distance": pl.Int32,
    })
    return _smallest(pl.concat([empty, *candidates]), ["kind", "shard", "uid"], "duplicate_of_shard", "duplicate_of")


@dataclass
class PassResult:
    mode: str  # full | incremental | unchanged | empty
    index_version: int | None = None
    marks_version: int | None = None
    shards_changed: list[str] = field(default_factory=list)
    rows_checked: int = 0
    newly_marked: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema={"kind": pl.String, "shard": pl.String, "uid": pl.Int64}))
    unmarked: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema={"kind": pl.String, "shard": pl.String, "uid": pl.Int64}))


def _changed_shards(lake: Lake, since: int, now: int) -> set[str] | None:
    """Shards whose entries changed between two index versions, from the commit history;
    None when the history cannot tell (then everything is recomputed)."""
    table = lake.table(INDEX)
    commits = [c for c in table.history(limit=table.version() - since) if since < c["version"] <= now]
    if len(commits) != now - since:
        return None
    shards = set()
    for c in commits:
        if "shard" in c:
            shards.add(c["shard"])
        elif c.get("operation") not in NO_CHANGE:
            return None
    return shards


def run_pass(lake: Lake, cfg: DedupConfig) -> PassResult:
    """Bring the marks up to date with the index: only the key groups touched since the last
    pass (all of them on the first pass, after a layout change, or when history is gone)."""
    if not lake.exists(INDEX):
        return PassResult("empty")
    _check_layout(lake, cfg)
    now = lake.table(INDEX).version()
    state = passes.last_state(lake, DUPLICATES)
    if state and state.get("layout") == layout(cfg) and state.get("index_version") == now:
        return PassResult("unchanged", now, lake.table(DUPLICATES).version())
    changed = _changed_shards(lake, state["index_version"], now) if state and state.get("layout") == layout(cfg) else None
    index = pl.scan_delta(lake.table_uri(INDEX), version=now, storage_options=lake.storage_options)
    if changed is not None:
        try:
            entries = _changed_entries(lake, index, state["index_version"], changed)
        except Exception:  # the old version's files were vacuumed: recompute everything
            changed, entries = None, None
    if changed is None:
        return _full_pass(lake, index, now, cfg)
    return _incremental_pass(lake, index, now, sorted(changed), entries, cfg)


def _changed_entries(lake: Lake, index: pl.LazyFrame, since: int, shards: set[str]) -> pl.DataFrame:
    """The changed shards' entries, before and after: the groups they were or are in may change."""
    before = pl.scan_delta(lake.table_uri(INDEX), version=since, storage_options=lake.storage_options)
    picked = [lf.filter(pl.col("shard").is_in(list(shards))).select("bucket", "kind", "key", "phash").collect() for lf in (before, index)]
    return pl.concat(picked).unique()


def _groups(index: pl.LazyFrame, keys: pl.DataFrame):
    """The complete groups of `keys` (bucket, key), one bucket in memory at a time."""
    for (bucket,), wanted in keys.group_by("bucket"):
        yield index.filter((pl.col("bucket") == bucket) & pl.col("key").is_in(wanted["key"].unique().implode())).collect()


def _incremental_pass(lake: Lake, index: pl.LazyFrame, now: int, shards: list[str], changed: pl.DataFrame, cfg: DedupConfig) -> PassResult:
    d = cfg.phash_distance
    # pHash: only rows within the distance of a changed hash can change their mark...
    probes = band_keys(changed.filter(pl.col("kind") == "phash")["phash"].unique().to_numpy().view(np.uint64), cfg)
    near = [
        g.filter(pl.col("kind") == "phash").join(probes.select("key", probe="phash"), on="key")
        .filter(pl.col("phash").xor(pl.col("probe")).bitwise_count_ones() <= d).select("shard", "uid", "phash")
        for g in _groups(index, probes)
    ]
    rows = pl.concat([pl.DataFrame(schema={"shard": pl.String, "uid": pl.Int64, "phash": pl.Int64}), *near]).unique()
    # ... and their marks need every band group they are in; exact keys need only their group.
    keys = pl.concat([
        changed.filter(pl.col("kind") != "phash").select("bucket", "key"),
        band_keys(rows["phash"].unique().to_numpy().view(np.uint64), cfg).select("bucket", "key"),
    ]).unique()
    candidates, checked = [], 0
    recomputed = [rows.select(pl.lit("phash").alias("kind"), "shard", "uid")]
    for groups in _groups(index, keys):
        checked += groups.height
        exact = groups.filter(pl.col("kind") != "phash")
        recomputed.append(exact.select("kind", "shard", "uid"))
        candidates.append(exact_candidates(exact))
        candidates.append(phash_candidates(groups.filter(pl.col("kind") == "phash"), rows.select("shard", "uid"), d))
    new = reduce_marks(candidates)
    return _publish(lake, now, shards, pl.concat(recomputed).unique(), new, cfg, "incremental", checked)


def _full_pass(lake: Lake, index: pl.LazyFrame, now: int, cfg: DedupConfig) -> PassResult:
    candidates, checked = [], 0
    for bucket in range(cfg.buckets):  # one bucket in memory at a time
        groups = index.filter(pl.col("bucket") == bucket).collect()
        checked += groups.height
        candidates.append(exact_candidates(groups.filter(pl.col("kind") != "phash")))
        candidates.append(phash_candidates(groups.filter(pl.col("kind") == "phash"), None, cfg.phash_distance))
    return _publish(lake, now, None, None, reduce_marks(candidates), cfg, "full", checked)


def _publish(lake: Lake, now: int, shards: list[str] | None, recomputed: pl.DataFrame | None, new: pl.DataFrame,
             cfg: DedupConfig, mode: str, checked: int) -> PassResult:
    """Write the marks of the recomputed rows (and drop those of rows gone from the changed
    shards) in one commit that records the index version it reflects."""
    rid = ["kind", "shard", "uid"]
    old_all = lake.scan(DUPLICATES) if lake.exists(DUPLICATES) else pl.from_arrow(MARKS_SCHEMA.empty_table()).lazy()
    state = {"index_version": now, "layout": layout(cfg)}
    if recomputed is None:  # full
        old = old_all.collect()
        content, predicate, touched = new, None, old
    else:
        affected = sorted(set(shards) | set(recomputed["shard"].unique().to_list()))
        old = old_all.filter(pl.col("shard").is_in(affected)).collect()
        touched = old.filter(pl.col("shard").is_in(shards)).vstack(old.join(recomputed, on=rid, how="semi")).unique()
        content = pl.concat([old.join(touched, on=rid, how="anti").select(new.columns), new.select(new.columns)])
        predicate = passes.in_list("shard", affected or [""])
    table = content.select(MARKS_SCHEMA.names).to_arrow().cast(MARKS_SCHEMA)
    version = passes.write(lake, DUPLICATES, table, mode="overwrite", predicate=predicate, partition_by=["shard"], state=state)
    return PassResult(
        mode, now, version, shards or [], checked,
        newly_marked=new.join(touched, on=rid, how="anti").select(rid),
        unmarked=touched.join(new, on=rid, how="anti").select(rid),
    )


def lake_figures(lake: Lake) -> tuple[pl.DataFrame, dict]:
    """Duplicates per shard and kind, and in total (for the UI)."""
    if not lake.exists(DUPLICATES):
        return pl.DataFrame(), {k: 0 for k in KINDS}
    counts = lake.scan(DUPLICATES).group_by("shard", "kind").len().collect()
    per_shard = counts.pivot(on="kind", index="shard", values="len").fill_null(0).sort("shard")
    for k in KINDS:
        if k not in per_shard.columns:
            per_shard = per_shard.with_columns(pl.lit(0, pl.UInt32).alias(k))
    totals = {k: int(per_shard[k].sum()) for k in KINDS}
    return per_shard.select("shard", *KINDS), totals
