"""Pictures for the UI: thumbnail grids from stored bytes, histograms with thresholds drawn,
what subsets threshold, failures by kind, column descriptions, gate failure lines."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import polars as pl
from PIL import Image

from laion_assets.core.lake import quality
from laion_assets.core.scores.config import LAION_SCORES
from laion_assets.core.subsets.rules import SubsetConfig
from laion_assets.core.ui import pictures
from laion_assets.core.ui.columns import describe
from laion_assets.core.ui.views import failures_markdown, subset_thresholds


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
    assert grid.width == 4 * (64 + 6) + 6 and grid.height == 2 * (64 + 4 * 12 + 6 + 6) + 6  # 2 rows of 4
    a = np.asarray(grid).astype(int)
    for i, color in enumerate(colors):  # the centre of each image cell has the image's colour
        x, y = 6 + (i % 4) * 70 + 32, 6 + (i // 4) * (64 + 54 + 6) + 32
        assert np.abs(a[y, x] - color).max() < 40, (i, a[y, x])


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
    from laion_assets_tests.conftest import make_config

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
