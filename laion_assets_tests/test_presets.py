"""LAION's published subsets as presets: the numbers, the shipped configs, the rule fields."""

from pathlib import Path

import polars as pl
import pytest

from laion_assets.core.config import load_config
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.subsets.predicates import dropped_counts, predicate
from laion_assets.core.subsets.rules import SubsetConfig, from_recipe

REPO = Path(__file__).resolve().parent.parent


def test_presets_carry_the_published_numbers():
    p = {name: SubsetConfig(preset=name) for name in (
        "laion400m", "laion2b_en", "laion2b_multi", "laion1b_nolang", "laion_aesthetics_v1", "laion_art",
        "laion_aesthetics_v2_4_5", "laion_aesthetics_v2_5", "laion_aesthetics_v2_6", "laion_aesthetics_v2_6_25",
        "laion_aesthetics_v2_6_5", "relaion_research", "relaion_research_safe")}
    assert (p["laion400m"].similarity_model, p["laion400m"].min_similarity) == ("ViT-B-32/openai", 0.3)
    assert (p["laion2b_en"].languages, p["laion2b_en"].min_similarity) == (("en",), 0.28)
    assert (p["laion2b_multi"].exclude_languages, p["laion2b_multi"].min_similarity) == (("en", "nolang"), 0.26)
    assert (p["laion1b_nolang"].languages, p["laion1b_nolang"].min_similarity) == (("nolang",), 0.26)
    assert all((s.min_caption_chars, s.min_image_bytes) == (5, 5000) for n, s in p.items() if n.startswith(("laion400m", "laion2b", "laion1b")))
    assert (p["laion_aesthetics_v1"].below, p["laion_aesthetics_v1"].above) == ({"punsafe": 0.5, "pwatermark": 0.8}, {"aesthetic": 7.0})
    assert p["laion_art"].above == {"aesthetic": 8.0}
    assert [p[f"laion_aesthetics_v2_{t}"].at_least["aesthetic_v2"] for t in ("4_5", "5", "6", "6_25", "6_5")] == [4.5, 5, 6, 6.25, 6.5]
    assert p["relaion_research_safe"].below == {"punsafe": 0.5} and not p["relaion_research"].threshold_columns


def test_shipped_configs_load(monkeypatch):
    monkeypatch.setenv("LAION_MODELS", "/models")
    laion = load_config(REPO / "configs" / "laion.yaml")
    assert {s.preset for s in laion.subsets} >= {"laion2b_en", "laion2b_multi", "laion1b_nolang", "relaion_research_safe"}
    assert [laion.similarity_space(s) for s in laion.subsets[:4]] == ["b32", "b32", "mclip", "mclip"]
    assert laion.head_space("punsafe") == "l14" and laion.scores.heads["punsafe"].path.startswith("/models/")
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert all("demo" in s.name for s in demo.subsets) and len(demo.embeddings.spaces) == 2


def test_overrides_old_fields_and_refusals(tmp_path):
    own = SubsetConfig(preset="laion_aesthetics_v1", name="mine", below={"pwatermark": 0.5})
    assert own.below == {"punsafe": 0.5, "pwatermark": 0.5} and own.above == {"aesthetic": 7.0}
    old = SubsetConfig(name="old", max_punsafe=0.5, min_aesthetic=6, max_pwatermark=0.8)
    assert (old.below, old.at_least) == ({"punsafe": 0.5, "source_pwatermark": 0.8}, {"aesthetic": 6})
    assert from_recipe({"rule": own.rule()}).rule() == own.rule()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("subsets:\n  - {preset: laion2b_xx}\n")
    with pytest.raises(LaionAssetsError, match="unknown preset 'laion2b_xx'"):
        load_config(cfg)
    cfg.write_text("subsets:\n  - {preset: laion_aesthetics_v1}\n")
    with pytest.raises(LaionAssetsError, match="thresholds aesthetic, punsafe, pwatermark, which nothing computes"):
        load_config(cfg)
    cfg.write_text("embeddings:\n  spaces:\n    a: {model: tiny}\n    b: {model: tiny-l}\nsubsets:\n  - {preset: laion2b_en}\n")
    with pytest.raises(LaionAssetsError, match="published for ViT-B-32/openai, which no space is"):
        load_config(cfg)


def test_rules_count_each_drop_once_under_its_first_rule():
    pool = pl.DataFrame({
        "uid": [1, 2, 3, 4, 5, 6],
        "status": ["success", "success", "success", "success", "success", "failed_download"],
        "caption_chars": [20, 3, 20, 20, 20, None],
        "bytes_downloaded": [9000, 9000, 100, 9000, 9000, None],
        "language": ["en", "en", "en", "de", "en", None],
        "language_confidence": [0.99, 0.99, 0.99, 0.99, 0.5, None],
        "similarity": [0.3, 0.3, 0.3, 0.3, 0.3, None],
    })
    sub = SubsetConfig(preset="laion2b_en", min_language_confidence=0.7)
    assert pool.filter(predicate(sub))["uid"].to_list() == [1]
    assert dropped_counts(pool, sub) == {
        "no_image": 1, "min_caption_chars": 1, "min_image_bytes": 1, "languages": 2, "min_similarity": 0,
    }
