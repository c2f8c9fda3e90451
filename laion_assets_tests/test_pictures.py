"""Pictures for the UI: thumbnail grids from stored bytes, histograms with thresholds drawn,
what subsets threshold, failures by kind, column descriptions, gate failure lines."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import polars as pl
from PIL import Image

from laion_assets.core.embeddings.config import EmbeddingConfig, SpaceConfig
from laion_assets.core.lake import quality
from laion_assets.core.lake.delta import Lake
from laion_assets.core.scores.config import LAION_SCORES, HeadConfig, ScoresConfig
from laion_assets.core.stages import embeddings_table
from laion_assets.core.subsets.rules import SubsetConfig
from laion_assets.core.ui import pictures, views
from laion_assets.core.ui.columns import describe
from laion_assets.core.ui.views import failures_markdown, subset_thresholds
from laion_assets_tests.conftest import make_config


def jpeg(color: tuple[int, int, int], size=(300, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "WEBP"
    return img.convert("RGB")


def red_pixels(img: Image.Image) -> int:
    a = np.asarray(img).astype(int)
    return int(((a[..., 0] > 180) & (a[..., 1] < 90) & (a[..., 2] < 90)).sum())


def test_thumbnail_grid_shows_each_stored_image_in_its_cell():
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 20), (20, 200, 200)]
    tiles = [pictures.Tile(jpeg(c), f"caption {i}", ("aes 5.1", "unsafe 0.02")) for i, c in enumerate(colors)]
    grid = decode(pictures.thumbnail_grid(tiles, columns=4, size=64))
    assert grid.width == 4 * (64 + 6) + 6 and grid.height == 2 * (64 + 5 * 12 + 6 + 6) + 6  # 2 rows of 4
    a = np.asarray(grid).astype(int)
    for i, color in enumerate(colors):  # the centre of each image cell has the image's colour
        x, y = 6 + (i % 4) * 70 + 32, 6 + (i // 4) * (64 + 66 + 6) + 32
        assert np.abs(a[y, x] - color).max() < 40, (i, a[y, x])


def ink_profiles(captions: list[str], size: int = 64) -> list[np.ndarray]:
    """The first caption line of each tile of one grid (same picture in every tile), as its ink
    summed per column and per row: a shape that WebP's noise barely moves."""
    grid = np.asarray(decode(pictures.thumbnail_grid([pictures.Tile(jpeg((90, 90, 90)), c) for c in captions], columns=4, size=size)))
    cell_h = (grid.shape[0] - 6) // -(-len(captions) // 4)  # picture, text under it, padding
    ink = 255 - grid.mean(axis=2)
    crops = [ink[6 + (i // 4) * cell_h + size + 2:][:12, 6 + (i % 4) * (size + 6):][:, :size] for i in range(len(captions))]
    return [np.concatenate([c.sum(axis=0), c.sum(axis=1)]) for c in crops]


def least_difference(letters: list[str]) -> float:
    """How unlike the two most alike letters look in a grid, each a caption of four of it."""
    shapes = ink_profiles([letter * 4 for letter in letters])
    return min(np.abs(a - b).sum() for i, a in enumerate(shapes) for b in shapes[i + 1:])


def test_captions_in_greek_and_cyrillic_are_drawn_with_real_glyphs():
    # a font without a script draws each of its letters as the same box ("tofu"): some 400
    # apart, WebP's noise; real letters are 3500 and more apart
    assert least_difference(sorted(set("a cat on the roof") - {" "})) > 2000
    assert least_difference(sorted(set("Кошка на крыше") - {" "})) > 2000
    assert least_difference(sorted(set("Γάτα στη στέγη") - {" "})) > 2000
    assert pictures.caption_font().getname()[0] == "DejaVu Sans"


def test_a_script_the_font_lacks_says_what_it_is_not_boxes():
    assert pictures.legible("木の椅子で眠る茶色の猫") == "[cjk×11]"
    assert pictures.legible("iPhone ケース\n Кошка") == "iPhone [katakana×3] Кошка"
    assert pictures.legible("แมว บน หลังคา") == "[thai×3] [thai×2] [thai×6]"  # code points, marks included
    lines = pictures.caption_lines("a cat " + "猫" * 40 + " sleeping on a wooden chair in the sun all day long", 112)
    assert lines[0] == "a cat [cjk×40] sleeping" and lines[1].endswith("…") and len(lines) == 2
    assert all(pictures.caption_font().getlength(line) <= 112 for line in lines)


def test_facts_keep_their_order_and_value_within_the_tile():
    lines = pictures.fact_lines(("aesthetic 5.42", "source_pwatermark_from_laion 0.12", "punsafe 0.02", "a 1", "b 2"), 112)
    assert lines[0] == "aesthetic 5.42" and lines[1].endswith("… 0.12") and lines[2].startswith("punsafe 0.02")
    assert all(pictures.caption_font().getlength(line) <= 112 for line in lines)


def test_undecodable_stored_image_is_marked_not_fatal():
    grid = decode(pictures.thumbnail_grid([pictures.Tile(b"not an image", "broken")], size=64))
    assert red_pixels(grid) > 50  # a red frame and label where the image would be


def test_histogram_draws_thresholds_and_stays_small():
    rng = np.random.default_rng(0)
    values = rng.normal(5, 1, 2000)
    plain = pictures.histograms([pictures.Panel("aesthetic", values)])
    marked = pictures.histograms([pictures.Panel("aesthetic", values, thresholds=(("aesthetics_6plus >= 6", 6.0),))])
    assert red_pixels(decode(plain)) == 0 and red_pixels(decode(marked)) > 50  # the dashed threshold line
    assert len(marked) < 20_000
    md = pictures.markdown_image("alt", marked)
    assert base64.b64decode(re.fullmatch(r"!\[alt\]\(data:image/webp;base64,(.+)\)", md).group(1)) == marked


def test_every_numeric_subset_field_is_a_threshold_on_its_column():
    subsets = (
        SubsetConfig(name="laion5b", min_similarity=0.28, max_punsafe=0.5),
        SubsetConfig(name="big", min_width=512, max_pwatermark=0.8),
    )
    subsets += (SubsetConfig(name="sharp", at_least={"sharpness": 2.5}, above={"aesthetic": 5}),)
    assert subset_thresholds(make_config(subsets=subsets)) == {
        "similarity/tiny": [("laion5b >= 0.28", 0.28)],  # the similarity of the subset's space
        "punsafe": [("laion5b < 0.5", 0.5)],
        "original_width": [("big >= 512", 512.0)],
        "source_pwatermark": [("big < 0.8", 0.8)],  # max_pwatermark reads LAION's column
        "sharpness": [("sharp >= 2.5", 2.5)],  # a column no code knows about
        "aesthetic": [("sharp > 5", 5.0)],
    }


def values(tile: pictures.Tile) -> dict[str, str]:
    return dict(fact.rsplit(" ", 1) for fact in tile.facts)


def test_score_and_subset_tiles_show_first_what_they_are_sorted_and_filtered_by(tmp_path):
    """Two similarity columns come before the heads' scores in the shard's score frame: the
    aesthetic a grid is sorted by must still be the first thing under each image."""
    from laion_assets_tests.synthetic import publish_shard

    heads = {c: HeadConfig(path=f"{c}.pth (scores written by the test)", space="b32") for c in ("aesthetic", "punsafe")}
    cfg = make_config(
        embeddings=EmbeddingConfig(spaces={"b32": SpaceConfig(model="tiny"), "l14": SpaceConfig(model="tiny-l")}),
        scores=ScoresConfig(heads=heads, allow_embedding_space_mismatch=True),
        subsets=(
            SubsetConfig(name="safe_pretty", similarity_space="b32", min_similarity=0.1, max_punsafe=0.4, at_least={"aesthetic": 3.0}),
            SubsetConfig(name="no_language", languages=["nolang"]),  # what CLD3 makes of "s0 caption 7"
            SubsetConfig(name="everything"),
        ),
    )
    lake = Lake(tmp_path / "lake")
    publish_shard(lake, cfg, "s0", 60, 3, 32, space="b32")
    b32 = lake.read_shard(embeddings_table("b32"), "s0").drop("shard")
    lake.publish_shard(embeddings_table("l14"), "s0", b32.with_columns(similarity=1 - b32["similarity"]))
    frame = views.score_frame(lake, "s0")
    assert frame.columns == ["uid", "similarity/b32", "similarity/l14", "aesthetic", "punsafe"]

    alt, tiles = views.score_tiles(lake, cfg, "s0", frame)
    assert alt == "shard s0 from lowest to highest aesthetic" and len(tiles) == 8
    aesthetic = [float(values(t)["aesthetic"]) for t in tiles]
    assert aesthetic == sorted(aesthetic) and aesthetic[0] == float(f"{frame['aesthetic'].min():.3g}")
    for tile in tiles:
        assert list(values(tile)) == ["aesthetic", "similarity/b32", "similarity/l14", "punsafe"]
        assert pictures.fact_lines(tile.facts, 112)[0].startswith("aesthetic ")  # drawn, not left out

    by = {}
    for sub in cfg.subsets:
        alt, tiles = views.subset_tiles(lake, cfg, sub, "s0", f"subsets/{sub.name}", frame)
        assert alt == f"rows of {sub.name} in shard s0" and tiles
        by[sub.name] = [values(t) for t in tiles]
    for row in by["safe_pretty"]:  # the rule's columns, in the order of its thresholds, and what it kept
        assert list(row) == ["similarity/b32", "aesthetic", "punsafe"]
        assert float(row["similarity/b32"]) >= 0.1 and float(row["aesthetic"]) >= 3.0 and float(row["punsafe"]) < 0.4
    assert by["no_language"] == [{"language": "nolang"}] * len(by["no_language"])
    assert list(by["everything"][0]) == ["similarity/b32", "similarity/l14", "aesthetic", "punsafe"]  # no rule: the scores
    for view in (views.scores_view(lake, cfg, "s0"), views.subset_view(lake, cfg, cfg.subsets[0], "s0", "subsets/safe_pretty")):
        assert view["thumbnails"].startswith("![")


def test_failures_by_kind_name_examples_without_links():
    meta = pl.DataFrame({
        "status": ["success", "http_error", "http_error", "failed_decode"],
        "error": [None, "HTTP 404", "HTTP 500", "not an image: HTML/XML document"],
        "http_status": [200, 404, 500, 200],
        "url": ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg", "http://a/4.jpg"],
    })
    md = failures_markdown(meta).splitlines()
    assert md[2].startswith("| http_error | 2 | 50.0% | HTTP 404 | `http://a/2.jpg` |")
    assert md[3] == "| | | | HTTP 500 | `http://a/3.jpg` |"
    assert md[4].startswith("| failed_decode | 1 | 25.0% | not an image")
    assert failures_markdown(meta.head(1)) == "no failures"


def test_columns_we_compute_and_source_columns_are_described_apart():
    assert "cosine similarity" in describe("embeddings", "similarity")
    assert describe("raw_urls", "similarity").startswith("from the input file: LAION's own CLIP")  # LAION's column
    assert "prefixed source_" in describe("subsets/laion5b", "source_similarity")
    assert describe("raw_urls", "LICENSE") == "from the input file: licence found on the source page"
    assert describe("raw_urls", "my_column") == "from the input file, kept as-is"
    assert describe("images", "my_column") == ""  # a computed column nobody described shows as missing


# the head each LAION score column comes from, as its description must name it
HEAD_OF = {
    "aesthetic": "aesthetic predictor V1",
    "aesthetic_v2": "improved aesthetic predictor V2",
    "punsafe": "NSFW detector",
    "pwatermark": "watermark classifier",
}


def test_each_score_column_is_described_by_its_own_head():
    """Where a score is computed and in a subset, its description names its head and no other
    (aesthetic_v2 once showed another column's description)."""
    assert set(HEAD_OF) == set(LAION_SCORES)
    for column, head in HEAD_OF.items():
        for table in ("watermark" if column == "pwatermark" else "scores", "subsets/laion_aesthetics_v2_6_5"):
            text = describe(table, column)
            others = [h for c, h in HEAD_OF.items() if c != column and h in text]
            assert head in text and not others, f"{table}.{column}: {text!r}"


def test_failed_expectation_names_threshold_and_observed_value():
    df = pl.DataFrame({"is_success": [True] + [False] * 3})
    report = quality.validate("images", "s", df, [
        quality.Expectation("ExpectColumnValuesToBeInSet", {"column": "is_success", "value_set": [True], "mostly": 0.5}),
    ])
    [line] = report.failures()
    assert line == (
        "expect_column_values_to_be_in_set(is_success): 3 unexpected of 4 (25.0% as expected), e.g. [False, False, False]; "
        "expected value_set=[True] for at least 50% of rows"
    )
