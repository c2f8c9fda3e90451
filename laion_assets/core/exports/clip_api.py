"""clip-retrieval's back-end API over `Searcher`, so its `ClipClient`, its front end and scripts
written against them work on `laion-assets serve`: `POST /knn-service`, `GET /indices-list`,
`POST /metadata`, with clip-retrieval's request fields and response shapes (clip_back.py).

Where the lake differs it says so in docs/EXPORTS.md: an index holds image embeddings only
(modality "text" is refused), `deduplicate` collapses hits of one image (sha256),
`use_safety_model` drops hits with punsafe > 0.5 and `use_violence_detector` those with
pviolence > 0.5 where a head writes that column, and `aesthetic_score`/`aesthetic_weight` re-rank
the candidates by their own aesthetic score instead of moving the query (clip-retrieval
downloads mean embeddings per rating for that). `image_url` is fetched through the images
stage's fetcher, SSRF guard included.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from laion_assets.core.exports.search import Hit, Searcher, check_k, nearest
from laion_assets.core.images.config import DownloadConfig
from laion_assets.core.lake.errors import LaionAssetsError

UNSAFE = 0.5  # clip-retrieval's safety threshold (get_unsafe_items)


def clip_routes(searcher: Searcher, download: DownloadConfig) -> list[Route]:
    async def indices_list(request: Request) -> JSONResponse:
        return JSONResponse(searcher.subsets())

    async def knn_service(request: Request) -> JSONResponse:
        try:
            q = await request.json()
            image = await _query_image(q, download)
            hits = await run_in_threadpool(_knn, searcher, q, image)
        except LaionAssetsError as e:
            return JSONResponse({"error": str(e)}, 400)
        except (ValueError, TypeError, KeyError, binascii.Error) as e:
            return JSONResponse({"error": f"bad request ({type(e).__name__}: {e}): see clip-retrieval's /knn-service fields"}, 400)
        return JSONResponse([_result(hit) for hit in hits])

    async def metadata(request: Request) -> JSONResponse:
        try:
            q = await request.json()
            ids = [int(i) for i in q["ids"]]
            if not ids:
                return JSONResponse([])
            idx = searcher.index(q.get("indice_name") or None)
            found = [idx.record(i) for i in ids]
        except LaionAssetsError as e:
            return JSONResponse({"error": str(e)}, 400)
        except (ValueError, TypeError, KeyError) as e:
            return JSONResponse({"error": f"send JSON {{ids, indice_name}} ({type(e).__name__}: {e})"}, 400)
        return JSONResponse([{"id": i, "metadata": {**rec, "uid": str(rec["uid"]), "shard": shard}} for i, (shard, rec) in zip(ids, found)])

    return [
        Route("/indices-list", indices_list),
        Route("/knn-service", knn_service, methods=["POST"]),
        Route("/metadata", metadata, methods=["POST"]),
    ]


async def _query_image(q: dict, download: DownloadConfig) -> bytes | None:
    """The query image: base64 `image`, or `image_url` fetched like an input URL (SSRF guard,
    size cap, timeouts of `download`)."""
    if q.get("text"):
        return None
    if q.get("image"):
        return base64.b64decode(q["image"], validate=True)
    if q.get("image_url"):
        from laion_assets.core.images.fetch import Fetcher

        async with Fetcher(download.model_copy(update={"retries": 0})) as fetcher:
            got = await fetcher.fetch(q["image_url"])
        if got.status != "success":
            raise LaionAssetsError(f"image_url could not be fetched: {got.status} ({got.error})")
        return got.body
    return None


def _knn(searcher: Searcher, q: dict, image: bytes | None) -> list[Hit]:
    if q.get("modality", "image") != "image":
        raise LaionAssetsError("the lake's kNN indexes hold image embeddings only: use modality \"image\"")
    num_images = int(q.get("num_images", 40))
    check_k(num_images)
    idx = searcher.index(q.get("indice_name") or None)
    if q.get("text") or image:
        query = searcher.encoder(idx)(q.get("text") or None, image)
    elif q.get("embedding_input") is not None:
        query = np.asarray(q["embedding_input"], np.float32).reshape(-1)
        if query.shape[0] != idx.manifest["dim"]:
            raise LaionAssetsError(f"embedding_input has {query.shape[0]} dimensions, the {idx.subset} index {idx.manifest['dim']}")
        query = query / max(float(np.linalg.norm(query)), 1e-12)
    else:
        raise LaionAssetsError("must fill one of text, image, image_url and embedding_input")
    unsafe = [c for c, on in (("punsafe", q.get("use_safety_model")), ("pviolence", q.get("use_violence_detector"))) if on]

    def keep(hit: Hit) -> bool:
        return not any((hit.scores.get(c) or 0.0) > UNSAFE for c in unsafe)

    candidates = max(num_images, min(int(q.get("num_result_ids") or num_images), 10_000))
    hits = nearest(idx, query, candidates, bool(q.get("deduplicate", False)), keep if unsafe else None)
    score, weight = q.get("aesthetic_score", ""), q.get("aesthetic_weight", "")
    if score not in ("", None) and weight not in ("", None) and float(weight) > 0:
        hits.sort(key=lambda h: -(h.score - float(weight) * abs((h.scores.get("aesthetic") or 0.0) - float(score)) / 10))
    return hits[:num_images]


def _result(hit: Hit) -> dict:
    """One result as clip-retrieval sends it (url, caption, id, similarity), plus ours."""
    return {
        "url": hit.url, "caption": hit.caption, "id": hit.id, "similarity": hit.score,
        "uid": str(hit.uid), "shard": hit.shard, "sha256": hit.sha256, **hit.scores,
        "thumbnail": f"/thumbnail/{hit.shard}/{hit.uid}",
    }
