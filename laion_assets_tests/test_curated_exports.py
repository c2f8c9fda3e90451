"""What a consumer reads is the curated truth: two shards sharing planted duplicates, then a
hash blocklist added; after one more plain run no tar of any subset holds a blocked row or a
duplicate its subset excludes (read back with the `webdataset` library), the kNN indexes return
none of them, and `train-args` names only current tars. An export left behind by a change of
its subset is refused by `train-args` and search, with the command that fixes it."""

from __future__ import annotations

import hashlib
import re
import shlex

import braceexpand
import polars as pl
import pytest
from dagster import instance_for_test

from laion_assets.cli import main
from laion_assets.cli.pipeline import run_pipeline
from laion_assets.cli.shard_runs import UP_TO_DATE
from laion_assets.core.curation import passes
from laion_assets.core.curation.config import BlocklistConfig, CurationConfig
from laion_assets.core.embeddings import vectors
from laion_assets.core.exports import freshness
from laion_assets.core.exports.config import ExportConfig, KnnConfig
from laion_assets.core.exports.search import SubsetIndex
from laion_assets.core.exports.webdataset import train_shards
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.subsets.rules import SubsetConfig
from laion_assets_tests.conftest import make_config, write_config

SUBSETS = ("similar", "unique")


def shard_files(site, server, folder):
    """Shard a: half the sample images; shard b: the other half and six of a's images again
    (same URL, another caption: exact url and sha256 duplicates of a's rows)."""
    root, entries = site
    folder.mkdir()
    rows = [{"URL": f"{server.base_url}/img/{e['file']}", "TEXT": e["caption"]} for e in entries]
    half = len(rows) // 2
    again = [{**r, "TEXT": f"{r['TEXT']} (again)"} for r in rows[:6]]
    pl.DataFrame(rows[:half]).write_parquet(folder / "part-a.parquet")
    pl.DataFrame(rows[half:] + again).write_parquet(folder / "part-b.parquet")
    return [entries[i]["file"] for i in range(half)], [entries[i]["file"] for i in range(half, len(entries))]


def tar_uids(lake: Lake, subset: str) -> tuple[set[int], int]:
    """uids of every sample in the tars train-args would name, read by `webdataset`."""
    import webdataset as wds

    urls, samples = train_shards(lake, subset)
    uids = [s["json"]["uid"] for s in wds.WebDataset(urls, shardshuffle=False).decode()]
    assert len(uids) == samples
    return set(uids), len(urls)


def excluded(lake: Lake) -> dict[str, set[int]]:
    """Per subset, the uids it must not hold: blocked rows, and (unique) the marked duplicates."""
    blocked = set(pl.read_delta(lake.table_uri("curation/blocked"))["uid"]) if lake.exists("curation/blocked") else set()
    dups = set(pl.read_delta(lake.table_uri("curation/duplicates"))["uid"])
    return {"similar": blocked, "unique": blocked | dups}


def assert_consumers_see_the_subsets(lake: Lake, capsys) -> None:
    out = excluded(lake)
    for subset in SUBSETS:
        rows = set(pl.read_delta(lake.table_uri(f"subsets/{subset}"))["uid"])
        assert not rows & out[subset]
        in_tars, tars = tar_uids(lake, subset)
        assert in_tars == rows, f"{subset}: the tars hold other rows than the subset"
        assert freshness.stale_exports(lake, subset) == [] and freshness.stale_index(lake, subset) == []
        # the index holds exactly the subset: a query with an excluded row's own vector finds no excluded row
        index = SubsetIndex(lake, subset)
        emb = pl.read_delta(lake.table_uri("embeddings/tiny")).filter(pl.col("uid").is_in(list(out[subset])))
        if emb.height:
            hits = index.search(vectors.from_column(emb["image_embedding"]), 10)
            assert not {h.uid for row in hits for h in row} & out[subset]
        assert main(["train-args", "--subset", subset, "--lake", lake.uri]) == 0
        printed = capsys.readouterr().out
        data = shlex.split(printed)[shlex.split(printed).index("--train-data") + 1]
        named = [url for part in data.split("::") for url in braceexpand.braceexpand(part)]
        assert named == train_shards(lake, subset)[0] and len(named) == tars
        assert f"--train-num-samples {len(rows)}" in printed


@pytest.mark.slow
def test_one_run_after_a_blocklist_leaves_no_excluded_row_in_any_export(site, server, tmp_path, capsys):
    a_files, _ = shard_files(site, server, tmp_path / "input")
    lists = tmp_path / "lists"
    lists.mkdir()
    cfg = make_config(
        subsets=(SubsetConfig(name="similar", min_similarity=-1.0, max_punsafe=0.99),
                 SubsetConfig(name="unique", min_similarity=-1.0, exclude_duplicates=("url", "sha256", "phash"))),
        export=ExportConfig(samples_per_tar=8), knn=KnnConfig(),
        curation=CurationConfig(blocklists=BlocklistConfig(location=str(lists))),
    )
    config = write_config(tmp_path / "config.yaml", cfg)
    lake = Lake(tmp_path / "lake")
    inputs = [str(tmp_path / "input")]
    with instance_for_test() as instance:
        first = run_pipeline(inputs, lake.uri, str(config), None, instance=instance)
        assert first.ok, first.lines
        dups = excluded(lake)["unique"]
        assert len(dups) >= 6  # the planted copies (and the sample's own near-copies)
        assert_consumers_see_the_subsets(lake, capsys)

        # a blocklist arrives: two images that are in both shards, one only in shard a
        site_root = site[0]
        listed = [a_files[0], a_files[1], a_files[-1]]
        (lists / "partner.sha256.txt").write_text("".join(hashlib.sha256((site_root / f).read_bytes()).hexdigest() + "\n" for f in listed))
        second = run_pipeline(inputs, lake.uri, str(config), None, instance=instance)
        assert second.ok, second.lines
        blocked = excluded(lake)["similar"]
        assert len(blocked) == 5  # 2 images x 2 shards + 1
        assert_consumers_see_the_subsets(lake, capsys)

        # a plain rerun of the finished lake: every stage, export and lake-wide asset up to date
        third = run_pipeline(inputs, lake.uri, str(config), None, instance=instance)
        assert third.ok and all(line.status == UP_TO_DATE for line in third.lines), third.lines
        assert {"webdataset/unique", "knn/unique", "curation/duplicates", "curation/blocked", "lake_summary"} <= {line.asset for line in third.lines}

        # a subset changed behind the exports' back (no pass, no run): train-args and search refuse
        victim = pl.read_delta(lake.table_uri("subsets/similar")).select("shard", "uid").head(1)
        passes.remove_from_subset(lake, "subsets/similar", victim, reason="test: by hand")
        capsys.readouterr()
        assert main(["train-args", "--subset", "similar", "--lake", lake.uri]) == 2
        refused = capsys.readouterr()
        assert "webdataset export of subset 'similar' is older than the subset" in refused.err and not refused.out
        with pytest.raises(LaionAssetsError, match="kNN index of subset 'similar' is older than the subset"):
            SubsetIndex(lake, "similar")
        fix = re.search(r"with: (laion-assets run .*)$", refused.err.strip()).group(1)
        assert "--select webdataset_similar" in fix and "part-" in fix
        # the command it names brings the export up to date
        args = shlex.split(fix)[2:]
        select = args[args.index("--select") + 1]
        files = [a for a in args[: args.index("--lake")]]
        fixed = run_pipeline(files, lake.uri, str(config), select, instance=instance)
        assert fixed.ok, fixed.lines
        assert freshness.stale_exports(lake, "similar") == []
        assert int(victim["uid"][0]) not in tar_uids(lake, "similar")[0]
