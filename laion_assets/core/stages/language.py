"""language: the language of every caption of a shard (CLD3 with LAION's reliability rule)."""

from __future__ import annotations

import logging
import time

import polars as pl

from laion_assets.core.config import PipelineConfig
from laion_assets.core.lake import quality
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import explained
from laion_assets.core.lake.tables import LANGUAGE, RAW_URLS
from laion_assets.core.scores import language
from laion_assets.core.stages import fingerprints
from laion_assets.core.stages.publish import StageOutput, gate, publish

log = logging.getLogger(__name__)


@explained
def run_language(lake: Lake, cfg: PipelineConfig, shard: str) -> StageOutput:
    """One row per raw_urls row: `language` (a code where CLD3 is reliable, else nolang, as
    LAION split LAION-5B), CLD3's `language_guess` and its `language_confidence`, and the
    cleaned caption's length `caption_chars` (LAION's alt-text length filter)."""
    fingerprint = fingerprints.current(lake, cfg, LANGUAGE, shard)
    raw = lake.read_shard(RAW_URLS, shard, ["uid", "caption"])
    started = time.monotonic()
    found = [language.detect(c) for c in raw["caption"].to_list()]
    elapsed = time.monotonic() - started
    detector = language.detector_name()
    rows = raw.select("uid").with_columns(
        language=pl.Series([d.language for d in found], dtype=pl.String),
        language_guess=pl.Series([d.guess for d in found], dtype=pl.String),
        language_confidence=pl.Series([d.confidence for d in found], dtype=pl.Float32),
        caption_chars=pl.Series([d.chars for d in found], dtype=pl.Int32),
        language_detector=pl.lit(detector),
    )
    counts = rows.group_by("language").len().sort("len", descending=True)
    stats = {
        "detector": detector,
        "languages": dict(counts.head(15).iter_rows()),
        "distinct_languages": counts.filter(pl.col("language") != language.NOLANG).height,
        "en_fraction": round(rows.filter(pl.col("language") == "en").height / max(1, rows.height), 4),
        "nolang_fraction": round(rows.filter(pl.col("language") == language.NOLANG).height / max(1, rows.height), 4),
        "rows_per_s": round(rows.height / max(elapsed, 1e-9), 1),
    }
    report = gate(LANGUAGE, shard, rows.select("uid", "language", "language_confidence"), quality.language_suite(raw.height), stats)
    log.info("shard %s: %d captions, languages %s", shard, rows.height, stats["languages"])
    return publish(lake, LANGUAGE, shard, rows, report, stats, {"detector": detector}, fingerprint)
