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

from laion_assets.core import curation
from laion_assets.core.config import DedupConfig
from laion_assets.core.errors import LaionAssetsError
from laion_assets.core.lake import Lake, check_shard_key
from laion_assets.core.stages.publish import IMAGES

INDEX, DUPLICATES = "curation/dedup_keys", curation.DUPLICATES
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


def band_keys(values: np.ndarray, distance: int) -> list[tuple[int, list[bytes]]]:
    """For each band, the 16-byte key of every pHash's band value."""
    out = []
    for i, (lo, hi) in enumerate(bands(distance)):
        part = (values >> np.uint64(64 - hi)) & np.uint64((1 << (hi - lo)) - 1)
        out.append((i, [hashlib.blake2b(bytes((i,)) + int(v).to_bytes(8, "big"), digest_size=16).digest() for v in part]))
    return out


def _bucket(keys: list[bytes], buckets: int) -> np.ndarray:
    if not keys:
        return np.zeros(0, np.int32)
    head = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16)[:, :4].copy().view(">u4").ravel()
    return (head % buckets).astype(np.int32)


def index_entries(rows: pl.DataFrame, cfg: DedupConfig) -> pa.Table:
    """The index entries of a shard's rows (uid, url, status, sha256, phash): stored images only,
    since a row that is not stored cannot be a survivor."""
    rows = rows.filter(pl.col("status") == "success")
    kinds, keys, uids, phashes = [], [], [], []

    def add(kind: str, new_keys: list[bytes], new_uids, new_phash=None) -> None:
        kinds.extend([kind] * len(new_keys))
        keys.extend(new_keys)
        uids.extend(new_uids)
        phashes.extend(new_phash if new_phash is not None else [None] * len(new_keys))

    urls = rows.select("uid", norm=normalize_url(pl.col("url")))
    add("url", [hashlib.sha256(u.encode()).digest()[:16] for u in urls["norm"]], urls["uid"].to_list())
    sha = rows.filter(pl.col("sha256").is_not_null())
    add("sha256", [bytes.fromhex(h)[:16] for h in sha["sha256"]], sha["uid"].to_list())
    ph = rows.filter(pl.col("phash").is_not_null())
    values = phash_bits(ph["phash"].to_list())
    signed = values.view(np.int64).tolist()
    for _, band in band_keys(values, cfg.phash_distance):
        add("phash", band, ph["uid"].to_list(), signed)
    return pa.table({
        "bucket": pa.array(_bucket(keys, cfg.buckets), pa.int32()), "kind": pa.array(kinds, pa.string()),
        "key": pa.array(keys, pa.binary()), "uid": pa.array(uids, pa.int64()), "phash": pa.array(phashes, pa.int64()),
    })


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
    names = set(pa.schema(lake.table(IMAGES).schema().to_arrow()).names)
    df = lake.read_shard(IMAGES, shard, [c for c in columns if c in names])
    return df.with_columns(pl.lit(None, pl.String).alias(c) for c in columns if c not in names)


def update_index(lake: Lake, shard: str, cfg: DedupConfig) -> dict:
    """Replace `shard`'s entries in the key index (one commit; the pass marks duplicates)."""
    check_shard_key(shard)
    _check_layout(lake, cfg)
    rows = images_columns(lake, shard, ["uid", "url", "status", "sha256", "phash"])
    entries = index_entries(rows, cfg)
    entries = entries.append_column("shard", pa.array([shard] * entries.num_rows, pa.string()))
    version = curation.write(
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
    reps = _smallest(groups.select("phash", "shard", "uid"), ["phash"], "shard", "uid")
    values = groups.select("key", "phash").unique().join(reps, on="phash")
    near = (
        values.join(values, on="key", suffix="_o").filter(pl.col("phash") != pl.col("phash_o"))
        .with_columns(distance=pl.col("phash").xor(pl.col("phash_o")).bitwise_count_ones().cast(pl.Int32))
        .filter(pl.col("distance") <= distance)
        .select("phash", duplicate_of_shard="shard_o", duplicate_of="uid_o", distance="distance")
    )
    same = reps.select("phash", duplicate_of_shard="shard", duplicate_of="uid", distance=pl.lit(0, pl.Int32))
    left = groups.select("shard", "uid", "phash").unique()
    if rows is not None:
        left = left.join(rows, on=["shard", "uid"], how="semi")
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
    state = curation.last_state(lake, DUPLICATES)
    if state and state.get("layout") == layout(cfg) and state.get("index_version") == now:
        return PassResult("unchanged", now, lake.table(DUPLICATES).version())
    changed = _changed_shards(lake, state["index_version"], now) if state and state.get("layout") == layout(cfg) else None
    index = pl.scan_delta(lake.table_uri(INDEX), version=now, storage_options=lake.storage_options)
    if changed is not None:
        try:
            keys = _affected_keys(lake, index, state["index_version"], changed, cfg)
        except Exception:  # the old version's files were vacuumed: recompute everything
            changed, keys = None, None
    if changed is None:
        return _full_pass(lake, index, now, cfg)
    return _incremental_pass(lake, index, now, sorted(changed), keys, cfg)


def _affected_keys(lake: Lake, index: pl.LazyFrame, since: int, shards: set[str], cfg: DedupConfig) -> pl.DataFrame:
    """Keys of the changed shards' entries, before and after: their groups may have changed."""
    before = pl.scan_delta(lake.table_uri(INDEX), version=since, storage_options=lake.storage_options)
    picked = [
        lf.filter(pl.col("shard").is_in(list(shards))).select("bucket", "kind", "key").collect()
        for lf in (before, index)
    ]
    return pl.concat(picked).unique()


def _incremental_pass(lake: Lake, index: pl.LazyFrame, now: int, shards: list[str], keys: pl.DataFrame, cfg: DedupConfig) -> PassResult:
    # Rows of touched pHash groups need every band group they are in: add those bands' keys.
    ph_rows = (
        index.filter((pl.col("kind") == "phash") & pl.col("key").is_in(keys.filter(pl.col("kind") == "phash")["key"].implode()))
        .select("shard", "uid", "phash").unique().collect()
    )
    more = band_keys(ph_rows["phash"].unique().cast(pl.Int64).to_numpy().view(np.uint64), cfg.phash_distance)
    extra = [k for _, ks in more for k in ks]
    keys = pl.concat([keys, pl.DataFrame({"bucket": _bucket(extra, cfg.buckets), "kind": "phash", "key": pl.Series(extra, dtype=pl.Binary)})]).unique()
    candidates, checked = [], 0
    recomputed = [ph_rows.select(pl.lit("phash").alias("kind"), "shard", "uid")]
    for (bucket,), wanted in keys.group_by("bucket"):  # one bucket's groups in memory at a time
        groups = index.filter((pl.col("bucket") == bucket) & pl.col("key").is_in(wanted["key"].implode())).collect()
        checked += groups.height
        exact = groups.filter(pl.col("kind") != "phash")
        recomputed.append(exact.select("kind", "shard", "uid"))
        candidates.append(exact_candidates(exact))
        candidates.append(phash_candidates(groups.filter(pl.col("kind") == "phash"), ph_rows.select("shard", "uid"), cfg.phash_distance))
    new = reduce_marks(candidates)
    recomputed = pl.concat(recomputed).unique()
    return _publish(lake, now, shards, recomputed, new, cfg, "incremental", checked)


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
        content, predicate, write_mode = new, None, "overwrite"
        touched = old
    else:
        affected = sorted(set(shards) | set(recomputed["shard"].unique().to_list()))
        old = old_all.filter(pl.col("shard").is_in(affected)).collect()
        touched = old.filter(pl.col("shard").is_in(shards)).vstack(old.join(recomputed, on=rid, how="semi")).unique()
        content = pl.concat([old.join(touched, on=rid, how="anti").select(new.columns), new.select(new.columns)])
        predicate, write_mode = curation.in_list("shard", affected or [""]), "overwrite"
    table = content.select(MARKS_SCHEMA.names).to_arrow().cast(MARKS_SCHEMA)
    version = curation.write(lake, DUPLICATES, table, mode=write_mode, predicate=predicate, partition_by=["shard"], state=state)
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
