import polars as pl

from laion_assets.core.lake import quality


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


def test_success_rate_floor():
    df = pl.DataFrame({
        "uid": [1, 2, 3, 4], "status": ["success"] * 3 + ["http_error"], "width": [1] * 4,
        "is_success": [True] * 3 + [False], "has_image_iff_success": [True] * 4, "image_intact": [True] * 4,
    })
    statuses = ("success", "http_error")
    assert quality.validate("images", "s", df, quality.images_suite(4, statuses, 0.75)).success
    assert not quality.validate("images", "s", df, quality.images_suite(4, statuses, 0.8)).success
