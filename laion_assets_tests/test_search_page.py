"""The search page in a real browser (Debian's chromium through Playwright): a text query and
an image upload each show their planted neighbour first, with its thumbnail from the images
table, caption and score; a second copy of the text hit's image (same sha256) is collapsed into
it unless "every copy" is ticked. Served as `laion-assets serve` serves it: no pipeline config,
the index names its query model."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import polars as pl
import pytest
import uvicorn

from laion_assets.core.embeddings import vectors
from laion_assets.core.exports.knn import sync_index
from laion_assets.core.exports.search import Searcher
from laion_assets.core.exports.serve import search_app
from laion_assets_tests.synthetic import TEXT_QUERY, copy_lake

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def plant_copy(lake, planted) -> int:
    """s1's row with the text hit's sha256 (the synthetic lake repeats sha256 across shards) gets
    a vector near the text hit's: the same image found twice. Returns its uid."""
    text = lake.read_shard("images", "s0").filter(pl.col("uid") == planted["text_uid"])["sha256"][0]
    copy = lake.read_shard("images", "s1").filter(pl.col("sha256") == text)["uid"][0]
    emb = lake.read_shard("embeddings/tiny", "s1").drop("shard")
    x = np.array(vectors.from_column(emb["image_embedding"]), np.float32)
    own = vectors.from_column(lake.read_shard("embeddings/tiny", "s0").filter(pl.col("uid") == planted["text_uid"])["image_embedding"])[0]
    row = emb["uid"].to_list().index(copy)
    x[row] = (0.98 * own + 0.2 * x[row]) / np.linalg.norm(0.98 * own + 0.2 * x[row])
    lake.publish_shard("embeddings/tiny", "s1", emb.with_columns(image_embedding=pl.from_arrow(vectors.to_column(x, "float16"))))
    return copy


@pytest.fixture
def page_url(planted, tmp_path):
    lake = copy_lake(planted, tmp_path / "lake")
    planted = {**planted, "copy_uid": plant_copy(lake, planted)}
    sync_index(lake, planted["config"], "similar")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(search_app(Searcher(lake, device="cpu")), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", planted["copy_uid"]
    server.should_exit = True
    thread.join(10)


@pytest.mark.slow
def test_search_page_text_and_image_queries(page_url, planted, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    page_url, copy_uid = page_url
    query_image = tmp_path / "query.jpg"
    query_image.write_bytes(planted["image"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        page.goto(page_url)
        expect(page.locator("#subset option")).to_have_text(["similar"])

        page.fill("#text", TEXT_QUERY)
        page.click("#go")
        first = page.locator(".hit").first
        expect(first.locator(".caption")).to_have_text(planted["text_caption"], timeout=30_000)
        assert first.get_attribute("data-uid") == str(planted["text_uid"])
        assert float(first.locator(".score").inner_text()) == pytest.approx(1.0, abs=2e-3)
        expect(page.locator(".hit")).to_have_count(20)
        # the thumbnail is the stored image (40x30 in this lake), loaded from the images table
        first.locator("img").scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=first.locator("img").element_handle())
        assert first.locator("img").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [40, 30]
        expect(page.locator("#status")).to_contain_text("20 results in similar")
        # the second copy of the image is collapsed into the first hit, and shown when asked for
        expect(first.locator(".copies")).to_have_text("+1 copy of this image")
        assert str(copy_uid) not in page.locator(".hit").evaluate_all("hits => hits.map(h => h.dataset.uid)")
        page.check("#all-copies")
        page.click("#go")
        expect(page.locator(".hit").nth(1)).to_have_attribute("data-uid", str(copy_uid), timeout=30_000)
        expect(first).to_have_attribute("data-uid", str(planted["text_uid"]))
        expect(page.locator(".copies")).to_have_count(0)
        expect(page.locator(".hit")).to_have_count(20)
        page.uncheck("#all-copies")

        page.fill("#text", "")
        page.set_input_files("#image", str(query_image))
        expect(page.locator("#query-image")).to_be_visible()
        page.click("#go")
        expect(first).to_have_attribute("data-uid", str(planted["image_uid"]), timeout=30_000)
        expect(first.locator(".caption")).to_have_text(planted["image_caption"])
        page.screenshot(path=str(tmp_path / "search.png"), full_page=True)

        # a broken upload is a clear message, not a blank page
        (tmp_path / "broken.jpg").write_bytes(b"not an image")
        page.set_input_files("#image", str(tmp_path / "broken.jpg"))
        page.wait_for_timeout(200)
        page.click("#go")
        expect(page.locator("#status")).to_contain_text("could not be decoded")
        browser.close()
