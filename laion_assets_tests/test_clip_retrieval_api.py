"""`laion-assets serve` speaks clip-retrieval's back-end API: driven by clip-retrieval's own
`ClipClient` (its clip_client.py, loaded from the installed distribution: the package's
__init__ imports its Flask back end) for text, image, image_url and embedding queries, plus
/indices-list, /metadata and CORS as clip-retrieval sends them."""

from __future__ import annotations

import base64
import functools
import http.server
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import threading
import urllib.request

import polars as pl
import pytest
import requests

from laion_assets.core.exports.knn import sync_index
from laion_assets_tests.conftest import write_config
from laion_assets_tests.servers import free_port, wait_for
from laion_assets_tests.synthetic import TEXT_QUERY, copy_lake


def clip_client_module():
    path = importlib.metadata.distribution("clip-retrieval").locate_file("clip_retrieval/clip_client.py")
    spec = importlib.util.spec_from_file_location("clip_retrieval_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(planted, tmp_path_factory):
    """`laion-assets serve` over a copy of the planted lake, its config allowing 127.0.0.1 (so an
    image_url on the test's own server may be fetched), and that image server."""
    tmp = tmp_path_factory.mktemp("clip-api")
    lake = copy_lake(planted, tmp / "lake")
    sync_index(lake, planted["config"], "similar")
    (tmp / "site").mkdir()
    (tmp / "site/query.jpg").write_bytes(planted["image"])
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp / "site")))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    port = free_port()
    config = write_config(tmp / "config.yaml", planted["config"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "laion_assets.cli", "serve", "--lake", str(tmp / "lake"), "--port", str(port), "--config", str(config)],
        stdout=(tmp / "serve.log").open("w"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/indices-list", timeout=2).status == 200, "laion-assets serve", 90, proc)
        yield {"url": f"http://127.0.0.1:{port}", "lake": lake, "image_url": f"http://127.0.0.1:{site.server_port}/query.jpg", "tmp": tmp}
    finally:
        proc.terminate()
        proc.wait(20)
        site.shutdown()


def test_clip_client_text_image_and_embedding_queries(served, planted, tmp_path):
    cc = clip_client_module()
    knn = served["url"] + "/knn-service"
    assert requests.get(served["url"] + "/indices-list", timeout=10).json() == ["similar"]

    client = cc.ClipClient(knn, "similar", num_images=7, aesthetic_weight=0, use_safety_model=False)
    text = client.query(text=TEXT_QUERY)
    assert len(text) == 7 and set(text[0]) >= {"url", "caption", "id", "similarity"}
    assert text[0]["caption"] == planted["text_caption"] and text[0]["similarity"] == pytest.approx(1.0, abs=2e-3)
    assert [r["similarity"] for r in text] == sorted((r["similarity"] for r in text), reverse=True)

    (tmp_path / "q.jpg").write_bytes(planted["image"])
    image = client.query(image=str(tmp_path / "q.jpg"))
    assert image[0]["caption"] == planted["image_caption"] and image[0]["uid"] == str(planted["image_uid"])
    by_url = client.query(image=served["image_url"])  # fetched by the server, allowed by its config
    assert by_url[0]["id"] == image[0]["id"]

    vector = client.query(embedding_input=planted["vector"].tolist())
    assert vector[0]["uid"] == str(planted["vector_uid"]) and vector[0]["similarity"] == pytest.approx(1.0, abs=2e-3)

    # num_images is honoured; /metadata answers for the ids the knn service gave
    many = cc.ClipClient(knn, "similar", num_images=25, aesthetic_weight=0, use_safety_model=False).query(text=TEXT_QUERY)
    assert len(many) == 25
    meta = requests.post(served["url"] + "/metadata", json={"ids": [r["id"] for r in many[:3]], "indice_name": "similar"}, timeout=10).json()
    assert [m["id"] for m in meta] == [r["id"] for r in many[:3]]
    assert [(m["metadata"]["url"], m["metadata"]["caption"]) for m in meta] == [(r["url"], r["caption"]) for r in many[:3]]


def test_safety_dedup_and_aesthetic_options(served, planted):
    """use_safety_model drops punsafe > 0.5, deduplicate collapses one image's hits (same
    sha256), aesthetic_score/weight re-rank toward that score."""
    cc = clip_client_module()
    knn = served["url"] + "/knn-service"
    subset = pl.read_delta(served["lake"].table_uri("subsets/similar"))
    punsafe = dict(subset.select("uid", "punsafe").iter_rows())
    plain = dict(num_images=60, aesthetic_weight=0, use_safety_model=False, deduplicate=False)
    everything = cc.ClipClient(knn, "similar", **plain).query(text=TEXT_QUERY)
    assert len(everything) == 60
    # the synthetic lake's sha256 repeat across shards (row i of s0 and s1): some hits share one
    shas = [r["sha256"] for r in everything]
    assert len(set(shas)) < len(shas)
    unique = cc.ClipClient(knn, "similar", **{**plain, "deduplicate": True}).query(text=TEXT_QUERY)
    first: dict[str, int] = {}
    for r in cc.ClipClient(knn, "similar", **{**plain, "num_images": 1000}).query(text=TEXT_QUERY):
        first.setdefault(r["sha256"], r["id"])
    assert [r["id"] for r in unique] == list(first.values())[:60]  # the nearest hit of each image, in order

    # punsafe: the lake's scores are below 0.5, so safety filtering keeps all of them ...
    assert all(punsafe[int(r["uid"])] == pytest.approx(r["punsafe"]) for r in everything)
    safe = cc.ClipClient(knn, "similar", **{**plain, "use_safety_model": True}).query(text=TEXT_QUERY)
    assert [r["id"] for r in safe] == [r["id"] for r in everything]

    # aesthetic re-ranking: with full weight, hits nearer the asked score come first
    ranked = cc.ClipClient(knn, "similar", **{**plain, "aesthetic_score": 9, "aesthetic_weight": 1.0}).query(text=TEXT_QUERY)
    assert {r["id"] for r in ranked} == {r["id"] for r in everything}
    keys = [r["similarity"] - abs(r["aesthetic"] - 9) / 10 for r in ranked]
    assert keys == sorted(keys, reverse=True) and ranked != everything


def test_unsafe_hits_are_dropped(planted, tmp_path):
    """A lake whose nearest hits are unsafe: use_safety_model leaves them out and still returns
    num_images results."""
    from starlette.testclient import TestClient

    from laion_assets.core.exports.search import Searcher
    from laion_assets.core.exports.serve import search_app
    from laion_assets.core.stages import SCORES, run_subset

    lake, cfg = copy_lake(planted, tmp_path / "lake"), planted["config"]
    body = {"embedding_input": planted["vector"].tolist(), "modality": "image", "num_images": 10, "indice_name": "similar"}

    def knn(**options) -> list[dict]:
        sync_index(lake, cfg, "similar")
        return TestClient(search_app(Searcher(lake, device="cpu"))).post("/knn-service", content=json.dumps({**body, **options})).json()

    near = {(r["shard"], int(r["uid"])) for r in knn()[:6]}
    for shard in {s for s, _ in near}:
        uids = [u for s, u in near if s == shard]
        scores = lake.read_shard(SCORES, shard).drop("shard")
        lake.publish_shard(SCORES, shard, scores.with_columns(punsafe=pl.when(pl.col("uid").is_in(uids)).then(0.9).otherwise(pl.col("punsafe"))))
        run_subset(lake, cfg, next(s for s in cfg.subsets if s.name == "similar"), shard)
    unsafe = knn(use_safety_model=False)
    assert {(r["shard"], int(r["uid"])) for r in unsafe[:6]} == near and all(r["punsafe"] == pytest.approx(0.9) for r in unsafe[:6])
    safe = knn(use_safety_model=True)
    assert len(safe) == 10 and not {(r["shard"], int(r["uid"])) for r in safe} & near and all(r["punsafe"] <= 0.5 for r in safe)
    assert [r["id"] for r in safe[:4]] == [r["id"] for r in unsafe[6:10]]


def test_cors_and_ssrf_guard(served, planted):
    """CORS as flask-cors sends it (any origin, echoed); without a config allowing it, an
    image_url on a private address is refused, never fetched."""
    pre = requests.options(served["url"] + "/knn-service", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type",
    }, timeout=10)
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.test"
    got = requests.get(served["url"] + "/indices-list", headers={"Origin": "http://example.test"}, timeout=10)
    assert got.headers["access-control-allow-origin"] == "http://example.test"

    from laion_assets.core.exports.search import Searcher
    from laion_assets.core.exports.serve import search_app
    from starlette.testclient import TestClient

    http = TestClient(search_app(Searcher(served["lake"], device="cpu")))  # what `serve` runs without --config
    r = http.post("/knn-service", content=json.dumps({"image_url": served["image_url"], "modality": "image", "num_images": 3, "indice_name": "similar"}))
    assert r.status_code == 400 and "refused_address" in r.json()["error"]
    r = http.post("/knn-service", content=json.dumps({"text": "x", "modality": "text", "num_images": 3, "indice_name": "similar"}))
    assert r.status_code == 400 and "image embeddings only" in r.json()["error"]
    r = http.post("/knn-service", content=json.dumps({"text": "x", "modality": "image", "num_images": 3, "indice_name": "nope"}))
    assert r.status_code == 400 and "nope" in r.json()["error"]
    # the page's own API takes clip-retrieval's names too
    hits = http.post("/api/search", json={"text": TEXT_QUERY, "num_images": 4, "indice_name": "similar"}).json()["hits"]
    assert len(hits) == 4 and hits[0]["uid"] == str(planted["text_uid"])
    b64 = base64.b64encode(planted["image"]).decode()
    hits = http.post("/knn-service", content=json.dumps({"image": b64, "modality": "image", "num_images": 2, "indice_name": "similar"})).json()
    assert hits[0]["uid"] == str(planted["image_uid"])
