"""The fault corpus (fault_corpus.py) as one input shard, through the real raw_urls and images
stages (decode worker processes, GX gates, Delta tables) against the hostile server on
127.0.0.1. Every case gets its exact status; every input row has exactly one fate in the lake.
SSRF cases are decided without connecting: private names go through a resolver stub, redirects
point only at loopback variants or stub names."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pytest
from PIL import Image

from laion_assets.core import stages
from laion_assets.core.images.config import DownloadConfig, ImageConfig
from laion_assets.core.images.download import STATUSES
from laion_assets.core.ingest import registry
from laion_assets.core.ingest.reader import REASONS
from laion_assets.core.lake.delta import Lake
from laion_assets.core.stages.raw_urls import RAW_URLS_REJECTED, input_row_fates
from laion_assets_tests.conftest import make_config
from laion_assets_tests.fault_corpus import (
    MAX_BODY,
    MODE_FILES,
    RESOLVE,
    build_cases,
    mode_check,
    write_bombs,
    write_mode_images,
)
from laion_assets_tests.faultsite import StubResolver

CASES = build_cases()


@dataclass
class Corpus:
    rows: dict[str, dict]  # case id -> its fate joined with its images row
    fates: pl.DataFrame
    raw: pl.DataFrame
    images: pl.DataFrame
    rejected: pl.DataFrame
    raw_stats: dict
    expected_pixels: dict
    resolver: StubResolver


@pytest.fixture(scope="module")
def corpus(testsite, tmp_path_factory) -> Corpus:
    site, base = testsite
    port = base.rsplit(":", 1)[1]
    expected_pixels = write_mode_images(site.root)
    assert {name: Image.open(site.root / name).mode for name in expected_pixels} == MODE_FILES
    write_bombs(site.root)
    tmp = tmp_path_factory.mktemp("corpus")
    shard = tmp / "faults.parquet"
    pl.DataFrame({
        "URL": [c.address(base, port) for c in CASES],
        "TEXT": [c.caption or c.id for c in CASES],
    }).write_parquet(shard)
    cfg = make_config(
        download=DownloadConfig(
            allowed_networks=("127.0.0.1/32",), per_host=64, retries=1, backoff_s=0.05, max_retry_after_s=3,
            max_body_bytes=MAX_BODY, max_redirects=3, connect_timeout_s=1, read_timeout_s=1,
            total_timeout_s=2.5, min_success_rate=0, chunk_rows=16,
        ),
        images=ImageConfig(size=32, resize_mode="no", format="png"),
    )
    lake = Lake(tmp / "lake")
    registry.register(lake, [str(shard)])
    raw_out = stages.run_raw_urls(lake, cfg, "faults")
    resolver = StubResolver(RESOLVE)
    stages.run_images(lake, cfg, "faults", resolver=resolver)
    fates = input_row_fates(lake, "faults")
    images = lake.read_shard(stages.IMAGES, "faults")
    joined = fates.join(images.drop("shard"), on="uid", how="left")
    rows = {c.id: joined.row(i, named=True) for i, c in enumerate(CASES)}
    return Corpus(
        rows, fates, lake.read_shard(stages.RAW_URLS, "faults"), images,
        lake.read_shard(RAW_URLS_REJECTED, "faults"), raw_out.stats, expected_pixels, resolver,
    )


def test_corpus_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_each_case_gets_its_exact_status(corpus, testsite, case):
    row = corpus.rows[case.id]
    assert row["outcome"] == case.status, (row["outcome"], row["detail"])
    if case.check:
        case.check(row, testsite[0])
    if case.kind == "odd image mode" and case.status == "success":
        mode_check(case.name, corpus.expected_pixels[case.name])(row, testsite[0])
    if case.status in STATUSES:
        assert (row["image"] is not None) == (case.status == "success")


def test_every_input_row_has_exactly_one_fate(corpus):
    """raw_urls + raw_urls_rejected = the input rows, each once; the images table has one row
    per raw_urls row; the stage's figures add up."""
    n = len(CASES)
    assert corpus.fates["source_row"].to_list() == list(range(n))
    assert corpus.fates["outcome"].null_count() == 0
    assert corpus.raw.height + corpus.rejected.height == n
    assert sorted(corpus.images["uid"].to_list()) == sorted(corpus.raw["uid"].to_list())
    kept_out = corpus.raw_stats["kept_out"]
    assert corpus.raw_stats["input_rows"] == n == corpus.raw_stats["rows"] + sum(kept_out.values())
    assert kept_out == {r: sum(c.status == r for c in CASES) for r in REASONS}
    dup = corpus.rejected.filter(pl.col("reason") == "duplicate_uid").row(0, named=True)
    original = corpus.raw.filter(pl.col("uid") == dup["uid"]).row(0, named=True)
    assert dup["duplicate_of_row"] == original["source_row"]


def test_private_names_were_resolved_by_the_stub_only(corpus):
    asked = set(corpus.resolver.asked)
    assert {"internal.test", "metadata.test", "home.test", "cgnat.test", "ula6.test", "link6.test", "xn--bcher-kva.test"} <= asked


def test_docs_document_every_status_and_reason():
    from pathlib import Path

    from laion_assets.core.images.download import I2D_STATUS

    readme = (Path(__file__).resolve().parent.parent / "docs" / "TABLES.md").read_text()
    for status in STATUSES:
        assert f"| `{status}` |" in readme and f"| {I2D_STATUS[status]} |" in readme, status
    for reason in REASONS:
        assert f"| `{reason}` |" in readme, reason
    assert set(I2D_STATUS) == set(STATUSES)
    # the corpus exercises every status the network and decode halves can produce
    assert {c.status for c in CASES} >= set(STATUSES) - {"blocked", "too_small", "bad_aspect_ratio", "opted_out"}
