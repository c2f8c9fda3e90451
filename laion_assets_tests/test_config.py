import pytest

from laion_assets.core.config import PipelineConfig, load_config
from laion_assets.core.errors import LaionAssetsError


def test_defaults_are_laion_semantics():
    cfg = load_config(None)
    assert cfg.embeddings.space == "ViT-B-32/openai"
    laion5b = cfg.subsets[0]
    assert (laion5b.min_similarity, laion5b.max_punsafe) == (0.28, 0.5)


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("images:\n  sise: 256\n")
    with pytest.raises(LaionAssetsError, match=r"unknown key 'images.sise'"):
        load_config(p)


def test_bad_value_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("images:\n  resize_mode: stretch\n")
    with pytest.raises(LaionAssetsError, match="images.resize_mode"):
        load_config(p)
    with pytest.raises(LaionAssetsError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_demo_config_is_valid():
    from laion_assets_tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.embeddings.model == "tiny"
    assert isinstance(cfg, PipelineConfig)


def test_recipe_id_changes_with_thresholds():
    a, b = load_config(None).subsets[0], load_config(None).subsets[0].model_copy(update={"min_similarity": 0.3})
    assert a.recipe("m", "1")["recipe_id"] != b.recipe("m", "1")["recipe_id"]
