"""Filter before fetch: a LAION-Aesthetics-style subset chosen from published L/14 vectors and
LAION's metadata, with the real aesthetic V2 head of models/, then only its rows downloaded,
exported as webdataset and indexed for search; lineage shows that path."""

from __future__ import annotations

import io
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from laion_assets.cli import main
from laion_assets.core.config import PipelineConfig
from laion_assets.core.embeddings import vectors
from laion_assets.core.exports.search import SubsetIndex
from laion_assets.core.exports.webdataset import train_shards
from laion_assets.core.ingest.reader import laion_uid
from laion_assets.core.lake.delta import Lake
from laion_assets.core.scores.config import HeadConfig
from laion_assets.core.scores.heads import load_head
from laion_assets_tests.conftest import write_config
from laion_assets_tests.published import unit, write_parquet_npy
from laion_assets_tests.test_runs import write_instance

REPO = Path(__file__).resolve().parent.parent
AESTHETIC_V2 = REPO / "models/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
SUBSET = "aesthetics_6_5"


class CountingImages(BaseHTTPRequestHandler):
    """Any path is a small JPEG; every request is counted by path."""

    seen: Counter

    def do_GET(self):
        self.seen[self.path] += 1
        out = io.BytesIO()
        Image.new("RGB", (64, 48), (len(self.path) * 7 % 255, 90, 160)).save(out, "JPEG")
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(out.tell()))
        self.end_headers()
        self.wfile.write(out.getvalue())

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    handler = type("Handler", (CountingImages,), {"seen": Counter()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.seen
    httpd.shutdown()
    httpd.server_close()


def planted_vectors(head, sizes: list[int], rng) -> list[np.ndarray]:
    """Unit vectors, every third one pushed along the head's direction (the V2 MLP has no
    activations, so its score is affine in the vector)."""
    bias = head(np.zeros((1, 768)))[0]
    direction = head(np.eye(768, dtype=np.float32)) - bias
    direction /= np.linalg.norm(direction)
    parts = []
    for n in sizes:
        v = unit(rng, n, 768).astype(np.float32)
        v[::3] += 0.6 * direction
        parts.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    return parts


@pytest.mark.slow
def test_laion_aesthetics_from_published_vectors_downloads_only_its_rows(tmp_path, monkeypatch, image_server, capsys):
    base_url, seen = image_server
    monkeypatch.setenv("DAGSTER_HOME", str(write_instance(tmp_path / "home")))
    head = load_head("aesthetic", HeadConfig(path=str(AESTHETIC_V2), trained_on="ViT-L-14/openai"))
    sizes = [40, 35, 30]
    root = tmp_path / "laion-l14"
    written = write_parquet_npy(root, sizes, base_url=base_url, image_vectors=planted_vectors(head, sizes, np.random.default_rng(1)))

    # what the subset must hold, from the files themselves: aesthetic >= 6.5 by the real V2
    # head on the stored float16 vectors, and LAION's own punsafe column below 0.5
    meta = pl.concat(written["metadata"])
    score = head(np.concatenate(written["img"]).astype(np.float32))
    chosen = meta.filter(pl.Series(score >= 6.5) & (pl.col("punsafe") < 0.5))
    assert 0 < chosen.height < meta.height / 3
    expected = {laion_uid(u, t) for u, t in zip(chosen["URL"], chosen["TEXT"])}

    cfg = PipelineConfig.model_validate({
        "embeddings": {"spaces": {"l14": {"model": "ViT-L-14", "pretrained": "openai", "adopted": True}}},
        "scores": {"heads": {"aesthetic": {"path": str(AESTHETIC_V2), "trained_on": "ViT-L-14/openai"}}},
        "download": {"only_subset": SUBSET, "allowed_networks": ["127.0.0.1/32"], "retries": 0},
        "subsets": [{"name": SUBSET, "at_least": {"aesthetic": 6.5}, "below": {"source_punsafe": 0.5}}],
        "export": {"samples_per_tar": 8}, "knn": {"subsets": [SUBSET]},
    })
    config, lake_dir = str(write_config(tmp_path / "config.yaml", cfg)), str(tmp_path / "lake")

    assert main(["adopt-embeddings", str(root), "--space", "l14", "--lake", lake_dir, "--config", config]) == 0
    assert "3 parts checked: 105 rows of 768-d ViT-L-14/openai vectors" in capsys.readouterr().out
    assert not seen  # adopting fetches nothing

    assert main(["run", str(root / "metadata"), "--lake", lake_dir, "--config", config]) == 0, capsys.readouterr().out
    lake = Lake(lake_dir)
    urls = {u: laion_uid(u, t) for u, t in zip(meta["URL"], meta["TEXT"])}
    # exactly the subset's rows were requested, each once
    assert {urls[base_url + path] for path in seen} == expected and set(seen.values()) == {1}
    images = lake.scan("images").collect()
    assert set(images["uid"]) == expected and set(images["status"]) == {"success"}
    subset = lake.scan(f"subsets/{SUBSET}").collect()
    assert set(subset["uid"]) == expected
    assert (subset["aesthetic"] >= 6.5).all() and (subset["source_punsafe"] < 0.5).all()

    # the webdataset export holds the subset, and its kNN index finds each row by its own vector
    _, samples = train_shards(lake, SUBSET)
    assert samples == len(expected)
    emb = lake.scan("embeddings/l14").filter(pl.col("uid").is_in(list(expected))).collect()
    hits = SubsetIndex(lake, SUBSET).search(vectors.from_column(emb["image_embedding"]), k=1)
    assert [h[0].uid for h in hits] == emb["uid"].to_list()


def test_lineage_shows_images_chosen_by_scores_of_adopted_vectors(tmp_path):
    from dagster import AssetKey

    from laion_assets.defs.definitions import build_defs
    from laion_assets.defs.resources import Settings

    cfg = PipelineConfig.model_validate({
        "embeddings": {"spaces": {"l14": {"model": "ViT-L-14", "pretrained": "openai", "adopted": True}}},
        "scores": {"heads": {"aesthetic": {"path": str(AESTHETIC_V2), "trained_on": "ViT-L-14/openai"}}},
        "download": {"only_subset": SUBSET},
        "subsets": [{"name": SUBSET, "at_least": {"aesthetic": 6.5}}],
    })
    graph = build_defs(Settings(lake=str(tmp_path / "lake"), config=str(write_config(tmp_path / "c.yaml", cfg)))).resolve_asset_graph()

    def parents(key: str) -> set[str]:
        return {k.to_user_string() for k in graph.get(AssetKey.from_user_string(key)).parent_keys}

    assert parents("embeddings_l14") == {"raw_urls"}  # adopted: no image needed
    assert parents("scores") == {"embeddings_l14"}
    assert parents("images") == {"raw_urls", "scores"}  # the download waits for the filter
    assert {"images", "scores", "embeddings_l14"} <= parents(f"subsets/{SUBSET}")


@pytest.mark.parametrize("subset,why", [
    ({"name": "s", "at_least": {"aesthetic": 6.5}}, "thresholds aesthetic, computed from images here"),
    ({"name": "s", "min_similarity": 0.3}, "filters on similarity in space b32, which is computed from images"),
])
def test_only_subset_refuses_rules_that_need_images(subset, why):
    with pytest.raises(ValueError, match=why):
        PipelineConfig.model_validate({
            "scores": {"heads": {"aesthetic": {"path": str(AESTHETIC_V2), "trained_on": "ViT-B-32/openai"}}},
            "download": {"only_subset": "s"}, "subsets": [subset],
        })
