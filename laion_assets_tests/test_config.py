import pytest

from laion_assets.core.config import PipelineConfig, load_config
from laion_assets.core.lake.errors import LaionAssetsError


def test_defaults_are_laion_semantics():
    cfg = load_config(None)
    assert {name: sp.identity for name, sp in cfg.embeddings.spaces.items()} == {"b32": "ViT-B-32/openai"}
    [en] = cfg.subsets  # LAION-2B-en's published rule
    assert (en.name, en.languages, en.similarity_model, en.min_similarity) == ("laion2b_en", ("en",), "ViT-B-32/openai", 0.28)
    assert (en.min_caption_chars, en.min_image_bytes) == (5, 5000)


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
    assert {name: sp.model for name, sp in cfg.embeddings.spaces.items()} == {"b32": "tiny", "l14": "tiny-l"}
    # LAION computed punsafe and both aesthetic scores on ViT-L/14: the demo feeds them l14
    assert {h: cfg.head_space(h) for h in cfg.scores.heads} == {"aesthetic": "l14", "punsafe": "l14", "aesthetic_v2": "l14"}
    assert isinstance(cfg, PipelineConfig)


def test_recipe_id_changes_with_thresholds():
    from laion_assets.core.stages.subsets import recipe

    cfg = load_config(None)
    a, b = cfg.subsets[0], cfg.subsets[0].model_copy(update={"min_similarity": 0.3})
    assert recipe(cfg, a)["recipe_id"] != recipe(cfg, b)["recipe_id"]
    assert recipe(cfg, a)["recipe_id"] == recipe(load_config(None), a)["recipe_id"]


def _write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


TWO_SPACES = """
embeddings:
  spaces:
    b32: {model: ViT-B-32, pretrained: openai}
    l14: {model: ViT-L-14, pretrained: openai}
"""


def test_heads_find_the_space_they_were_trained_on(tmp_path):
    cfg = load_config(_write(tmp_path, TWO_SPACES + """
scores:
  heads:
    punsafe: {path: n.pth, trained_on: ViT-L-14/openai}
    aesthetic: {path: a.pth, trained_on: ViT-B-32/openai}
subsets:
  - {name: en, similarity_space: b32, min_similarity: 0.28}
  - {name: pretty, min_aesthetic: 6}
"""))
    assert (cfg.head_space("punsafe"), cfg.head_space("aesthetic")) == ("l14", "b32")
    assert [cfg.similarity_space(s) for s in cfg.subsets] == ["b32", "b32"]


@pytest.mark.parametrize("text, message", [
    (TWO_SPACES + "scores:\n  heads:\n    aesthetic: {path: a.pth, trained_on: ViT-H-14/laion2b_s32b_b79k}\n",
     "trained on ViT-H-14/laion2b_s32b_b79k but no space in embeddings.spaces is that model"),
    (TWO_SPACES + "scores:\n  heads:\n    aesthetic: {path: a.pth, space: h14}\n", "space 'h14' is not a space"),
    (TWO_SPACES + "subsets:\n  - {name: en, min_similarity: 0.28}\n", "subset en: set similarity_space, one of b32, l14"),
    (TWO_SPACES + "subsets:\n  - {name: en, similarity_space: m, min_similarity: 0.2}\n", "similarity_space 'm' is not in"),
    ("embeddings:\n  spaces:\n    B-32: {model: tiny}\n", "space names must match"),
    ("embeddings:\n  model: ViT-L-14\n", "unknown key 'embeddings.model' (moved: embeddings.spaces.<name>.model)"),
    ("scores:\n  nsfw: {path: n.pth}\n", "unknown key 'scores.nsfw' (moved: scores.heads.punsafe)"),
])
def test_space_mistakes_are_named(tmp_path, text, message):
    with pytest.raises(LaionAssetsError) as e:
        load_config(_write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)
