"""Hash blocklists added after the fact: every matching row is marked, subsets lose it in a
new Delta version (the old one stays readable by time travel), and each pass publishes its
diff as a Delta table and parquet + CSV files. Duplicates leave the subsets that ask."""

from __future__ import annotations

import polars as pl
import pytest

from laion_assets.core.curation import blocklists
from laion_assets.core.curation.config import BlocklistConfig, CurationConfig, DedupConfig
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.stages import curation as stages
from laion_assets.core.stages import run_subset
from laion_assets_tests.lakes import config, publish_images, publish_shard, publish_subsets, row, sha, uids

SHARDS = {
    "a": [row(1, "http://ex.com/1.jpg", "one"), row(2, "http://ex.com/2.jpg", "two"), row(3, "http://ex.com/3.jpg", "three")],
    "b": [row(4, "http://ex.com/4.jpg", "four"), row(5, "http://ex.com/5.jpg", "one"), row(6, "http://EX.com/6.jpg", "six")],
}


@pytest.fixture
def setup(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    cfg = config(curation=CurationConfig(blocklists=BlocklistConfig(location=str(lists)), dedup=DedupConfig(buckets=2)))
    lake = Lake(tmp_path / "lake")
    for shard, rows in SHARDS.items():
        publish_shard(lake, shard, rows)
    publish_subsets(lake, cfg, list(SHARDS))
    return lake, cfg, lists


def test_a_list_added_after_the_fact_leaves_every_subset_in_a_new_version(setup):
    lake, cfg, lists = setup
    before = {s.name: lake.table(f"subsets/{s.name}").version() for s in cfg.subsets}
    (lists / "partner.md5.txt").write_text(f"# source: partner hotline, 2024-08\n{sha('one', 'md5')}\n# a comment\n")
    (lists / "links.url.txt").write_text("http://ex.com/6.jpg\n")  # the lake has it with an upper-case host
    (lists / "hashed.url_sha256.txt").write_text(sha("http://ex.com/2.jpg") + "\n")
    (lists / "README.md").write_text("not a list")

    report = stages.run_blocklists(lake, cfg)
    blocked = {("a", 1), ("b", 5), ("b", 6), ("a", 2)}
    assert report["mode"] == "full" and report["rows_blocked_total"] == 4
    assert report["rows_blocked_per_list"] == {"hashed": 1, "links": 1, "partner": 2}
    assert report["lists"]["partner"]["source"] == "partner hotline, 2024-08"
    for sub in cfg.subsets:
        table = f"subsets/{sub.name}"
        assert uids(lake, table) == uids(lake, table, before[sub.name]) - blocked
        assert blocked <= uids(lake, table, before[sub.name])  # time travel: the old version still has them
        assert lake.table(table).version() == before[sub.name] + 1  # one new version per subset

    diff = pl.read_delta(lake.table_uri(blocklists.DIFF))
    assert set(diff.select("list", "shard", "uid", "change").iter_rows()) == {
        ("partner", "a", 1, "removed"), ("partner", "b", 5, "removed"), ("links", "b", 6, "removed"), ("hashed", "a", 2, "removed"),
    }
    assert diff.filter(pl.col("list") == "links")["url"].to_list() == ["http://EX.com/6.jpg"]
    parquet, csv = report["diff_files"]
    assert pl.read_parquet(parquet).sort("uid").equals(diff.sort("uid").select(pl.read_parquet(parquet).columns))
    assert pl.read_csv(csv)["uid"].sort().to_list() == [1, 2, 5, 6]

    again = stages.run_blocklists(lake, cfg)
    assert again["mode"] == "unchanged" and lake.table("subsets/everything").version() == before["everything"] + 1


def test_new_shards_are_checked_and_withdrawn_entries_come_back(setup):
    lake, cfg, lists = setup
    (lists / "partner.sha256.txt").write_text(sha("one") + "\n" + sha("four") + "\n")
    stages.run_blocklists(lake, cfg)
    # a shard materialized after the list: only it is checked, and its subset leaves the row out
    publish_shard(lake, "c", [row(7, "http://ex.com/7.jpg", "one"), row(8, "http://ex.com/8.jpg", "eight")])
    report = stages.run_blocklists(lake, cfg)
    assert report["mode"] == "incremental" and report["shards_checked"] == ["c"]
    assert report["diff_rows"] == {"removed": 1, "restored": 0}
    run_subset(lake, cfg, cfg.subsets[0], "c")
    assert {u for s, u in uids(lake, "subsets/everything") if s == "c"} == {8}
    # the partner withdraws an entry: the diff says restored, and the row is back in the subsets
    (lists / "partner.sha256.txt").write_text(sha("one") + "\n")
    report = stages.run_blocklists(lake, cfg)
    assert report["diff_rows"] == {"removed": 0, "restored": 1}
    assert ("b", 4) in uids(lake, "subsets/everything") and ("b", 4) in uids(lake, "subsets/unique")


def test_a_bad_list_line_is_refused_with_its_place(setup):
    lake, cfg, lists = setup
    (lists / "partner.md5.txt").write_text("d41d8cd98f00b204e9800998ecf8427e\nnot-a-digest\n")
    with pytest.raises(LaionAssetsError, match=r"partner.md5.txt line 2"):
        stages.run_blocklists(lake, cfg)


def test_duplicates_leave_only_the_subsets_that_ask(setup):
    lake, cfg, _ = setup
    for shard in SHARDS:
        stages.run_dedup_keys(lake, cfg, shard)
    before = {s.name: lake.table(f"subsets/{s.name}").version() for s in cfg.subsets}
    report = stages.run_duplicates(lake, cfg)
    # b/5 has the bytes of a/1 (sha256 and pHash): the `unique` subset drops it, `everything` keeps it
    assert report["subsets_updated"]["unique"]["rows_removed"] == 1
    assert ("b", 5) not in uids(lake, "subsets/unique") and ("b", 5) in uids(lake, "subsets/everything")
    assert lake.table("subsets/everything").version() == before["everything"]
    assert report["duplicates_total"] == {"url": 0, "sha256": 1, "phash": 1}
    assert stages.run_duplicates(lake, cfg)["subsets_updated"] == {}  # nothing new: no new version


def test_a_subset_shard_published_while_a_pass_commits_does_not_keep_blocked_rows(setup, monkeypatch):
    """The interleaving that loses a mark without the guard: the subset stage reads the marks,
    a blocklist pass commits and deletes, then the stage publishes what it read."""
    lake, cfg, lists = setup
    (lists / "partner.sha256.txt").write_text(sha("two") + "\n")
    from laion_assets.core.curation import passes
    from laion_assets.core.stages import subsets as subset_stage

    real, calls = passes.with_marks, []

    def marks_then_a_pass_commits(*args):
        stale = real(*args)
        if not calls:
            calls.append(stages.run_blocklists(lake, cfg))
        return stale

    monkeypatch.setattr(subset_stage.passes, "with_marks", marks_then_a_pass_commits)
    stages.run_curated_subset(lake, cfg, cfg.subsets[0], "a")
    assert calls and calls[0]["rows_blocked_total"] == 1
    assert ("a", 2) not in uids(lake, "subsets/everything")


def test_images_published_before_the_digest_columns_are_handled(tmp_path):
    """A shard from before md5/sha1/phash: its sha256 and URL still match and dedup; md5 lists
    cannot match it, and the pass says how many stored rows it could not check."""
    lake = Lake(tmp_path / "lake")
    old = pl.DataFrame({"uid": [1, 2], "url": ["http://ex.com/1.jpg", "http://ex.com/2.jpg"], "status": ["success", "success"],
                        "sha256": [sha("one"), sha("two")]})
    lake.publish_shard("images", "old", old)
    publish_images(lake, "new", [row(3, "http://ex.com/3.jpg", "one")])
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "partner.md5.txt").write_text(sha("two", "md5") + "\n")
    (lists / "partner_bytes.sha256.txt").write_text(sha("two") + "\n")
    cfg = config(curation=CurationConfig(blocklists=BlocklistConfig(location=str(lists))))
    report = stages.run_blocklists(lake, cfg)
    assert report["rows_blocked_per_list"] == {"partner_bytes": 1}  # the md5 list cannot see shard `old`
    assert uids(lake, blocklists.BLOCKED) == {("old", 2)} and report["stored_rows_without_md5_sha1"] == 2
    for shard in ("old", "new"):
        stages.run_dedup_keys(lake, cfg, shard)
    stages.run_duplicates(lake, cfg)
    marks = pl.read_delta(lake.table_uri("curation/duplicates"))  # no pHash for `old`: sha256 only
    assert set(marks.select("kind", "shard", "uid", "duplicate_of_shard", "duplicate_of").iter_rows()) == {("sha256", "old", 1, "new", 3)}
