import logging
import subprocess
import sys

import polars as pl
import pytest

from laion_assets.core.lake import gate_process, quality


def test_failing_expectations_are_named_with_what_they_saw():
    df = pl.DataFrame({  # the raw_urls audit frame: every input row, kept or kept out
        "source_row": [0, 0, 1, 7], "uid": ["1", "1", None, None],
        "fetch_url": ["https://a", "ftp://b", None, None], "kept": [True, True, True, False],
        "kept_out_reason": [None, None, None, "lost"],
    })
    report = quality.validate("raw_urls", "s", df, quality.raw_urls_suite(5, ("missing_url",), 0.9))
    assert not report.success
    failed = {r.label for r in report.results if not r.passed}
    assert failed == {
        "expect_table_row_count_to_equal",
        "expect_column_values_to_be_unique(source_row)",
        "expect_column_values_to_be_between(source_row)",
        "expect_column_values_to_not_be_null(uid)",
        "expect_column_values_to_be_unique(uid)",
        "expect_column_values_to_not_be_null(fetch_url)",
        "expect_column_values_to_match_regex(fetch_url)",
        "expect_column_values_to_be_in_set(kept_out_reason)",
        "expect_column_values_to_be_null(kept_out_reason)",
    }
    assert "observed 4" in " ".join(report.failures())


def test_embedding_suite_checks_norms_and_similarity_range():
    good = pl.DataFrame({"uid": [1, 2], "similarity": [0.3, -0.1], "shape_ok": [True, True], "image_norm": [1.0, 0.999], "text_norm": [1.0, 1.0]})
    assert quality.validate("embeddings", "s", good, quality.embeddings_suite(2, 0.01)).success
    bad = good.with_columns(similarity=pl.Series([1.5, 0.0]), image_norm=pl.Series([0.5, 1.0]))
    report = quality.validate("embeddings", "s", bad, quality.embeddings_suite(2, 0.01))
    assert {r.label for r in report.results if not r.passed} == {
        "expect_column_values_to_be_between(similarity)", "expect_column_values_to_be_between(image_norm)",
    }


def test_float32_columns_are_judged_and_shown_as_written():
    """The embeddings stage's norms and similarities are float32 (GX compares them after an
    exact cast to float64); a failure shows the value as written, not its float64 expansion."""
    audit = pl.DataFrame({
        "uid": [1, 2], "similarity": [0.3, -0.1], "shape_ok": [True, True],
        "image_norm": [1.0, 1.2], "text_norm": [1.0, 1.0],
    }).with_columns(pl.col("similarity", "image_norm", "text_norm").cast(pl.Float32))
    report = quality.validate("embeddings", "s", audit, quality.embeddings_suite(2, 0.01))
    assert [r.label for r in report.results if not r.passed] == ["expect_column_values_to_be_between(image_norm)"]
    assert "1 unexpected of 2, e.g. [1.2]" in " ".join(report.failures())


def test_success_rate_floor():
    df = pl.DataFrame({
        "uid": [1, 2, 3, 4], "status": ["success"] * 3 + ["http_error"], "width": [1] * 4,
        "is_success": [True] * 3 + [False], "has_image_iff_success": [True] * 4, "image_intact": [True] * 4,
    })
    statuses = ("success", "http_error")
    assert quality.validate("images", "s", df, quality.images_suite(4, statuses, 0.75)).success
    assert not quality.validate("images", "s", df, quality.images_suite(4, statuses, 0.8)).success


def _raw_urls_audit() -> pl.DataFrame:
    return pl.DataFrame({
        "source_row": [0, 0, 1], "uid": ["1", "1", "2"], "fetch_url": ["https://a", "ftp://b", "https://c"],
        "kept": [True, True, True], "kept_out_reason": [None, None, None],
    })


def test_the_gate_process_reports_what_this_process_would(caplog):
    """A CLI run validates in a child that imported GX ahead (gate_process.py): same results."""
    caplog.set_level(logging.WARNING, logger=gate_process.__name__)
    df, suite = _raw_urls_audit(), quality.raw_urls_suite(3, ("missing_url",), 0.9)
    here = quality.validate_here("raw_urls", "s", df, suite)
    with gate_process.started() as gate:
        assert gate_process.current() is gate
        there = quality.validate("raw_urls", "s", df, suite)
        assert gate.proc.poll() is None  # it answered and is still there for the next gate
    assert gate.proc.returncode == 0 and gate_process.current() is None
    assert not caplog.records  # the child answered: no fallback to this process
    assert there == here and not there.success
    assert "expect_column_values_to_be_unique(uid)" in {r.label for r in there.results if not r.passed}


def test_a_gate_process_that_died_costs_nothing_but_its_head_start(caplog):
    df, suite = _raw_urls_audit(), quality.raw_urls_suite(3, ("missing_url",), 0.9)
    with gate_process.started() as gate:
        gate.proc.kill()
        gate.proc.wait()
        report = quality.validate("raw_urls", "s", df, suite)
    assert report == quality.validate_here("raw_urls", "s", df, suite)
    assert "validating in this process" in caplog.text


def test_an_error_in_the_gate_process_is_raised_here():
    with gate_process.started(), pytest.raises(AttributeError, match="ExpectNoSuchThing"):
        quality.validate("raw_urls", "s", _raw_urls_audit(), [quality.Expectation("ExpectNoSuchThing")])


def test_gx_expectations_that_use_scipy_stats_still_judge_after_its_deferred_import():
    """GX's context registers scipy.stats to load on first use; an expectation that needs it
    (KL divergence) must still load it and judge right. A fresh process: this one may hold it."""
    script = """
import sys, polars as pl
from laion_assets.core.lake import quality
from laion_assets.core.lake.quality import Expectation
quality.context()
deferred = type(sys.modules["scipy.stats"]).__name__ != "module"
df = pl.DataFrame({"lang": ["en"] * 90 + ["de"] * 10})
def kl(weights):
    kwargs = {"column": "lang", "partition_object": {"values": ["en", "de"], "weights": weights}, "threshold": 0.1}
    return quality.validate_here("t", "s", df, [Expectation("ExpectColumnKLDivergenceToBeLessThan", kwargs)]).success
print(deferred, kl([0.9, 0.1]), kl([0.5, 0.5]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["True", "True", "False"]
