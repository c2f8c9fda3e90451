"""Data-quality gates: one great-expectations suite per stage, run before a shard is published.

GX has no polars support, so the columns a suite needs are handed over as pandas. GX is
imported lazily (it takes seconds) and one ephemeral context is reused per process; a CLI run
imports it ahead, in a child process (gate_process.py), and validates there.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from dataclasses import dataclass, field

import polars as pl

_ctx_lock = threading.Lock()
_ctx = None


@dataclass(frozen=True)
class Expectation:
    """A GX expectation by class name and kwargs, so suites can be declared without GX loaded."""

    type: str
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckResult:
    label: str
    passed: bool
    observed: str
    expected: str = ""  # the expectation's threshold, e.g. "value_set=[True], mostly=0.5"

    def line(self) -> str:
        """One line a user can act on: what was seen and what was expected."""
        return f"{self.label}: {self.observed}; expected {self.expected or 'to hold'}"


@dataclass(frozen=True)
class Report:
    stage: str
    shard: str
    results: tuple[CheckResult, ...]

    @property
    def success(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[str]:
        return [r.line() for r in self.results if not r.passed]

    def as_metadata(self) -> dict[str, str]:
        return {
            r.label: ("passed" if r.passed else "FAILED") + f" ({r.observed}; expected {r.expected or 'to hold'})"
            for r in self.results
        }


def context():
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
            _defer_scipy_stats()
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig
            from great_expectations.execution_engine import pandas_execution_engine

            # GX fingerprints each pandas batch under 1 GB by hashing every value (a batch
            # marker we never read): 12% of a 250,000-row gate. A threshold of 0 skips it.
            pandas_execution_engine.HASH_THRESHOLD = 0
            _ctx = gx.get_context(mode="ephemeral")
            _ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
            _ctx.data_sources.add_pandas("shards").add_dataframe_asset("shard").add_batch_definition_whole_dataframe("whole")
        return _ctx


def _defer_scipy_stats() -> None:
    """Register `scipy.stats` to load on first use (importlib's LazyLoader). GX imports it for two
    expectations we never run (KL divergence, KS test): 2 of the 7 core-seconds of importing GX.
    It is also set on the `scipy` package, or `from scipy import stats` would import it again,
    and an import reads the module's `__spec__`, which loads a lazy module."""
    if "scipy.stats" in sys.modules or importlib.util.find_spec("scipy") is None:
        return
    import scipy

    spec = importlib.util.find_spec("scipy.stats")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    stats = importlib.util.module_from_spec(spec)
    sys.modules["scipy.stats"] = scipy.stats = stats
    spec.loader.exec_module(stats)


def validate(stage: str, shard: str, df: pl.DataFrame, expectations: list[Expectation]) -> Report:
    """Run the suite on `df`; results name each expectation and what it observed."""
    from laion_assets.core.lake import gate_process

    gate = gate_process.current()
    report = gate.validate(stage, shard, df, expectations) if gate else None
    return report if report is not None else validate_here(stage, shard, df, expectations)


def validate_here(stage: str, shard: str, df: pl.DataFrame, expectations: list[Expectation]) -> Report:
    """`validate` in this process."""
    import great_expectations as gx

    ctx = context()
    batch_def = ctx.data_sources.get("shards").get_asset("shard").get_batch_definition("whole")
    suite = gx.ExpectationSuite(name=f"{stage}")
    for exp in expectations:
        suite.add_expectation(getattr(gx.expectations, exp.type)(**exp.kwargs))
    batch = batch_def.get_batch(batch_parameters={"dataframe": _for_gx(df).to_pandas()})
    result = batch.validate(suite)
    checks = []
    for res in result.results:
        conf = res.expectation_config
        r = res.result or {}
        if r.get("unexpected_count") is not None:
            observed = f"{r['unexpected_count']} unexpected of {r.get('element_count')}"
            if conf.kwargs.get("mostly") is not None and r.get("unexpected_percent") is not None:
                observed += f" ({100 - r['unexpected_percent']:.1f}% as expected)"
            sample = [float(f"{v:.7g}") if isinstance(v, float) else v for v in (r.get("partial_unexpected_list") or [])[:3]]
            if sample and not res.success:
                observed += f", e.g. {sample}"
        else:
            observed = f"observed {r.get('observed_value')}"
        if res.exception_info and res.exception_info.get("raised_exception"):
            observed = f"error: {res.exception_info.get('exception_message')}"
        column = conf.kwargs.get("column")
        label = f"{conf.type}({column})" if column else conf.type
        checks.append(CheckResult(label, bool(res.success), observed, _threshold(conf.kwargs)))
    return Report(stage, shard, tuple(checks))


def _for_gx(df: pl.DataFrame) -> pl.DataFrame:
    """Numbers as int64 and float64: GX's pandas engine compares only those dtypes as arrays
    (`column.dtype in [int, float]`) and calls a Python function per value for any other, e.g.
    3 s for a 500,000-row embeddings gate's float32 norms. Both casts are exact."""
    small_ints = (pl.Int8, pl.Int16, pl.Int32, pl.UInt8, pl.UInt16, pl.UInt32)
    return df.with_columns(pl.col(pl.Float32).cast(pl.Float64), pl.col(small_ints).cast(pl.Int64))


_THRESHOLDS = ("value", "min_value", "max_value", "value_set", "regex", "mostly")


def _threshold(kwargs: dict) -> str:
    """The expectation's parameters a reader needs to judge the observed value."""
    parts = []
    for key in _THRESHOLDS:
        value = kwargs.get(key)
        if value is None:
            continue
        if isinstance(value, (list, tuple)) and len(value) > 8:
            value = f"[{', '.join(map(repr, value[:8]))}, ...]"
        parts.append(f"for at least {value:.0%} of rows" if key == "mostly" else f"{key}={value}")
    if parts and parts[0].startswith("for "):
        parts.insert(0, "to hold")
    return " ".join(parts)


# -- suites --------------------------------------------------------------------------------

def raw_urls_suite(input_rows: int, reasons: tuple[str, ...], min_usable_rate: float) -> list[Expectation]:
    """On every input row (kept and kept out): each row once, kept rows with a unique uid and
    an http(s) URL to fetch, kept-out rows with a known reason, and enough rows kept."""
    kept = {"row_condition": "kept == True", "condition_parser": "pandas"}
    return [
        Expectation("ExpectTableRowCountToEqual", {"value": input_rows}),
        Expectation("ExpectColumnValuesToBeUnique", {"column": "source_row"}),
        Expectation("ExpectColumnValuesToBeBetween", {"column": "source_row", "min_value": 0, "max_value": input_rows - 1}),
        Expectation("ExpectColumnValuesToNotBeNull", {"column": "uid", **kept}),
        Expectation("ExpectColumnValuesToBeUnique", {"column": "uid", **kept}),
        Expectation("ExpectColumnValuesToNotBeNull", {"column": "fetch_url", **kept}),
        Expectation("ExpectColumnValuesToMatchRegex", {"column": "fetch_url", "regex": r"^https?://[^/?#]", **kept}),
        Expectation("ExpectColumnValuesToBeInSet", {"column": "kept_out_reason", "value_set": list(reasons)}),
        Expectation("ExpectColumnValuesToBeNull", {"column": "kept_out_reason", "mostly": min_usable_rate}),
    ]


def images_suite(expected_rows: int, statuses: tuple[str, ...], min_success_rate: float) -> list[Expectation]:
    return [
        Expectation("ExpectTableRowCountToEqual", {"value": expected_rows}),
        Expectation("ExpectColumnValuesToBeUnique", {"column": "uid"}),
        Expectation("ExpectColumnValuesToBeInSet", {"column": "status", "value_set": list(statuses)}),
        Expectation(
            "ExpectColumnValuesToBeInSet",
            {"column": "is_success", "value_set": [True], "mostly": min_success_rate}
            if min_success_rate > 0 else {"column": "is_success", "value_set": [True, False]},
        ),
        Expectation("ExpectColumnValuesToBeInSet", {"column": "has_image_iff_success", "value_set": [True]}),
        Expectation("ExpectColumnValuesToBeBetween", {"column": "width", "min_value": 1}),
        # stored bytes equal to the sha256 taken when they were encoded
        Expectation("ExpectColumnValuesToBeInSet", {"column": "image_intact", "value_set": [True]}),
    ]


def embeddings_suite(expected_rows: int, tolerance: float) -> list[Expectation]:
    return [
        Expectation("ExpectTableRowCountToEqual", {"value": expected_rows}),
        Expectation("ExpectColumnValuesToBeUnique", {"column": "uid"}),
        Expectation("ExpectColumnValuesToBeBetween", {"column": "similarity", "min_value": -1.0, "max_value": 1.0}),
        Expectation("ExpectColumnValuesToBeInSet", {"column": "shape_ok", "value_set": [True]}),  # the model's dimension
        Expectation("ExpectColumnValuesToBeBetween", {"column": "image_norm", "min_value": 1 - tolerance, "max_value": 1 + tolerance}),
        Expectation("ExpectColumnValuesToBeBetween", {"column": "text_norm", "min_value": 1 - tolerance, "max_value": 1 + tolerance}),
    ]


def scores_suite(expected_rows: int, ranges: dict[str, tuple[float, float]]) -> list[Expectation]:
    """Every successful image scored by every head (an image missing from a head's space
    leaves a null), each score in its head's range."""
    suite = [
        Expectation("ExpectTableRowCountToEqual", {"value": expected_rows}),
        Expectation("ExpectColumnValuesToBeUnique", {"column": "uid"}),
    ]
    for column, (low, high) in ranges.items():
        suite += [
            Expectation("ExpectColumnValuesToNotBeNull", {"column": column}),
            Expectation("ExpectColumnValuesToBeBetween", {"column": column, "min_value": low, "max_value": high}),
        ]
    return suite


def subset_suite(max_rows: int) -> list[Expectation]:
    return [
        Expectation("ExpectTableRowCountToBeBetween", {"min_value": 0, "max_value": max_rows}),
        Expectation("ExpectColumnValuesToBeUnique", {"column": "uid"}),
        Expectation("ExpectColumnValuesToNotBeNull", {"column": "url"}),
    ]


def language_suite(expected_rows: int) -> list[Expectation]:
    """One language per raw_urls row; a code or nolang; confidence a probability."""
    return [
        Expectation("ExpectTableRowCountToEqual", {"value": expected_rows}),
        Expectation("ExpectColumnValuesToBeUnique", {"column": "uid"}),
        Expectation("ExpectColumnValuesToMatchRegex", {"column": "language", "regex": r"^([a-z]{2,3}|nolang)$"}),
        Expectation("ExpectColumnValuesToBeBetween", {"column": "language_confidence", "min_value": 0.0, "max_value": 1.0}),
    ]


def watermark_suite(expected_rows: int) -> list[Expectation]:
    return [
        Expectation("ExpectTableRowCountToEqual", {"value": expected_rows}),
        Expectation("ExpectColumnValuesToBeUnique", {"column": "uid"}),
        Expectation("ExpectColumnValuesToNotBeNull", {"column": "pwatermark"}),
        Expectation("ExpectColumnValuesToBeBetween", {"column": "pwatermark", "min_value": 0.0, "max_value": 1.0}),
    ]
