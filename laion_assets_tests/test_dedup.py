"""Lake-wide exact and perceptual duplicates on real Delta tables: the same survivors whatever
order or concurrency (real processes) the shards were materialized in, survivors kept when a
shard is re-materialized, incremental passes equal to a full recompute."""

from __future__ import annotations

import random
import subprocess
import sys

import polars as pl
import pytest

from laion_assets.core.curation import dedup
from laion_assets.core.curation.config import DedupConfig
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets_tests.lakes import publish_images, row

CFG = DedupConfig(buckets=4, phash_distance=4)
P1, P2 = 0x0F0F_0F0F_0F0F_0F0F, 0x1234_5678_9ABC_DEF0


def ph(value: int) -> str:
    return f"{value:016x}"


SHARD_A = [
    row(1, "http://Ex.com/x.jpg#top", "cat", ph(P1)),
    row(2, "http://ex.com/y.jpg", "dog", ph(P2)),
    row(3, "http://ex.com/z.jpg", status="failed_download"),
]
SHARD_B = [
    row(5, "http://ex.com:80/x.jpg", "cat, re-encoded", ph(P1 ^ 0b111)),  # same URL as a/1, pHash 3 bits away
    row(0, "http://ex.com/q.jpg", "dog", ph(P2)),  # same bytes as a/2
    row(8, "http://ex.com/q2.jpg", "dog", ph(P2)),  # and again, in the same shard
    row(7, "http://ex.com/z.jpg", "zebra", ph(~P1 & (2**64 - 1))),  # URL of a/3, which was not stored
    row(4, "http://ex.com/w.jpg", "wolf", ph(P2 ^ 0b111111)),  # 6 bits from a/2: beyond distance 4
]
EXPECTED = {
    ("url", "b", 5, "a", 1),
    ("sha256", "b", 0, "a", 2), ("sha256", "b", 8, "a", 2),
    ("phash", "b", 5, "a", 1), ("phash", "b", 0, "a", 2), ("phash", "b", 8, "a", 2),
}


def marks(lake: Lake) -> set[tuple]:
    df = pl.read_delta(lake.table_uri(dedup.DUPLICATES))
    return set(df.select("kind", "shard", "uid", "duplicate_of_shard", "duplicate_of").iter_rows())


def materialize(lake: Lake, shard: str, rows: list[dict]) -> dedup.PassResult:
    publish_images(lake, shard, rows)
    dedup.update_index(lake, shard, CFG)
    return dedup.run_pass(lake, CFG)


def test_normalised_urls_are_one_key():
    urls = pl.Series(["HTTP://Ex.COM:80/a?b=1#frag", "http://ex.com/a?b=1", "https://ex.com:443", "https://ex.com/", "http://ex.com/A"])
    out = pl.select(dedup.normalize_url(pl.lit(urls))).to_series().to_list()
    assert out == ["http://ex.com/a?b=1", "http://ex.com/a?b=1", "https://ex.com/", "https://ex.com/", "http://ex.com/A"]


def test_same_survivors_in_both_orders(tmp_path):
    ab, ba = Lake(tmp_path / "ab"), Lake(tmp_path / "ba")
    materialize(ab, "a", SHARD_A)
    second = materialize(ab, "b", SHARD_B)
    assert second.mode == "incremental" and second.shards_changed == ["b"]
    first = materialize(ba, "b", SHARD_B)
    assert ("sha256", "b", 8, "b", 0) in marks(ba)  # a survivor until a smaller copy arrives
    later = materialize(ba, "a", SHARD_A)
    assert marks(ab) == marks(ba) == EXPECTED
    assert first.mode == "full" and later.mode == "incremental"
    # b/0 lost its survivorship to a/2 when shard a arrived: reported so subsets can drop it
    assert ("sha256", "b", 0) in set(later.newly_marked.iter_rows())
    # nothing changed: no pass work, no new version
    assert dedup.run_pass(ab, CFG).mode == "unchanged"


def test_concurrent_shard_runs_lose_and_double_nothing(tmp_path):
    """Real processes write the index at once (shard a twice); one pass then gives the same
    marks as sequential runs, and every shard has exactly its own entries."""
    lake = Lake(tmp_path / "lake")
    shards = {"a": SHARD_A, "b": SHARD_B, "c": [row(10, "http://ex.com/y.jpg", "other", ph(P2 ^ 1))]}
    for shard, rows in shards.items():
        publish_images(lake, shard, rows)
    code = (
        "import sys; from laion_assets.core.curation import dedup; from laion_assets.core.curation.config import DedupConfig; "
        "from laion_assets.core.lake.delta import Lake; dedup.update_index(Lake(sys.argv[1]), sys.argv[2], DedupConfig(buckets=4, phash_distance=4))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, lake.uri, s]) for s in ["a", "b", "a", "c", "b"]]
    assert [p.wait(timeout=120) for p in procs] == [0] * 5
    index = pl.read_delta(lake.table_uri(dedup.INDEX))
    for shard, rows in shards.items():
        expected = pl.from_arrow(dedup.index_entries(pl.DataFrame(rows).drop("vector", "md5", "sha1"), CFG))
        got = index.filter(pl.col("shard") == shard).drop("shard")
        assert got.sort(pl.all()).equals(expected.select(got.columns).sort(pl.all()))
    assert index.height == index.unique().height
    dedup.run_pass(lake, CFG)
    assert marks(lake) == EXPECTED | {
        ("url", "c", 10, "a", 2), ("phash", "c", 10, "a", 2),
    }


def test_rematerialized_shard_keeps_its_survivors(tmp_path):
    lake = Lake(tmp_path / "lake")
    materialize(lake, "a", SHARD_A)
    materialize(lake, "b", SHARD_B)
    again = materialize(lake, "a", list(reversed(SHARD_A)))  # same rows, written again
    assert again.mode == "incremental" and again.shards_changed == ["a"]
    assert marks(lake) == EXPECTED
    assert again.newly_marked.is_empty() and again.unmarked.is_empty()
    # the survivor's image is gone in a new download: the next copy survives
    changed = materialize(lake, "a", [r if r["uid"] != 2 else row(2, r["url"], status="http_error") for r in SHARD_A])
    assert ("sha256", "b", 8, "b", 0) in marks(lake)
    assert {("sha256", "b", 0), ("phash", "b", 0)} <= set(changed.unmarked.iter_rows())


def test_incremental_passes_equal_a_full_recompute(tmp_path):
    """Random shards drawing URLs, images and pHashes from small pools, materialized and
    re-materialized in random order with a pass after each: the marks equal one full pass."""
    rnd = random.Random(7)
    base = [rnd.getrandbits(64) for _ in range(6)]

    def shard_rows(n: int) -> list[dict]:
        return [
            row(rnd.randrange(-2**40, 2**40), f"http://h{rnd.randrange(12)}.org/{rnd.randrange(12)}.jpg", f"img{rnd.randrange(25)}",
                ph(rnd.choice(base) ^ sum(1 << b for b in rnd.sample(range(64), rnd.randrange(6)))),
                status=rnd.choice(["success"] * 5 + ["failed_decode"]))
            for _ in range(n)
        ]

    inc = Lake(tmp_path / "inc")
    final = {}
    for step in range(9):
        shard = f"s{rnd.randrange(5)}"
        final[shard] = shard_rows(rnd.randrange(0, 15))
        materialize(inc, shard, final[shard])
    full = Lake(tmp_path / "full")
    for shard, rows in final.items():
        publish_images(full, shard, rows)
        dedup.update_index(full, shard, CFG)
    assert dedup.run_pass(full, CFG).mode == "full"
    assert marks(inc) == marks(full) and len(marks(full)) > 10


def test_a_mark_from_a_band_the_new_shard_did_not_touch(tmp_path):
    """b/1 duplicates a/1 through bands 1-4; shard c then shares only band 0 with b/1. The
    pass recomputes b/1 and must still read its other bands to keep its mark."""
    lake = Lake(tmp_path / "lake")
    bits = [lo for lo, _ in dedup.bands(4)]  # one bit in each band
    materialize(lake, "a", [row(1, "http://a/1", "a1", ph(P1 ^ (1 << (63 - bits[0]))))])
    materialize(lake, "b", [row(1, "http://b/1", "b1", ph(P1))])
    materialize(lake, "c", [row(1, "http://c/1", "c1", ph(P1 ^ sum(1 << (63 - b) for b in bits[1:])))])
    assert ("phash", "b", 1, "a", 1) in marks(lake)


def test_index_layout_change_is_refused_with_the_fix(tmp_path):
    lake = Lake(tmp_path / "lake")
    materialize(lake, "a", SHARD_A)
    with pytest.raises(LaionAssetsError, match="re-materialize curation/dedup_keys"):
        dedup.update_index(lake, "a", DedupConfig(buckets=8, phash_distance=4))
