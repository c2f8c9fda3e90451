"""The search page: one HTML page (text box, image upload, a grid of results with thumbnails,
captions and scores) and a small JSON API over `Searcher`, served by Starlette + uvicorn on
127.0.0.1 (or `--host`) — clip-retrieval's front end, and its back end's API (`clip_api.py`) in
the same process. CORS as clip-retrieval sends it (flask-cors' defaults: any origin, echoed)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from laion_assets.core.exports.clip_api import clip_routes
from laion_assets.core.exports.search import Searcher
from laion_assets.core.images.config import DownloadConfig
from laion_assets.core.exports.webdataset import image_ext
from laion_assets.core.lake.errors import LaionAssetsError

PAGE = Path(__file__).with_name("search.html")
MAX_UPLOAD = 16 * 2**20
MEDIA = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def search_app(searcher: Searcher, download: DownloadConfig | None = None) -> Starlette:
    """The page, its API and clip-retrieval's; `download` rules `image_url` fetches (its
    `allowed_networks` is the SSRF guard's exemption list: none by default)."""
    page = PAGE.read_text()

    def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    def subsets(request: Request) -> JSONResponse:
        return JSONResponse({"subsets": searcher.subsets()})

    async def search(request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_UPLOAD * 4 // 3 + 4096:
            return JSONResponse({"error": f"request too large (images up to {MAX_UPLOAD // 2**20} MiB)"}, 413)
        try:
            query = await request.json()
            image = base64.b64decode(query["image"], validate=True) if query.get("image") else None
            k = int(query.get("k") or query.get("num_images") or 20)  # clip-retrieval's names too
            subset = query.get("subset") or query.get("indice_name") or None
            deduplicate = query.get("deduplicate", True) is not False
        except (ValueError, TypeError, binascii.Error):
            return JSONResponse({"error": "send JSON: {text, image (base64), subset, k, deduplicate}"}, 400)
        try:
            # encoding and the faiss search block: off the event loop
            hits = await run_in_threadpool(searcher.search, (query.get("text") or "").strip() or None, image, subset, k, deduplicate)
        except LaionAssetsError as e:
            return JSONResponse({"error": str(e)}, 400)
        return JSONResponse({"hits": [
            {**hit.__dict__, "uid": str(hit.uid), "thumbnail": f"/thumbnail/{hit.shard}/{hit.uid}"} for hit in hits
        ]})

    def thumbnail(request: Request) -> Response:
        try:
            uid = int(request.path_params["uid"])
            blob = searcher.thumbnails.get(request.path_params["shard"], uid)
        except (ValueError, LaionAssetsError):
            blob = None
        if blob is None:
            return Response(status_code=404)
        return Response(blob, media_type=MEDIA.get(image_ext(blob, ""), "application/octet-stream"),
                        headers={"Cache-Control": "max-age=3600"})

    return Starlette(routes=[
        Route("/", index),
        Route("/api/subsets", subsets),
        Route("/api/search", search, methods=["POST"]),
        Route("/thumbnail/{shard}/{uid}", thumbnail),
        *clip_routes(searcher, download or DownloadConfig()),
    ], middleware=[Middleware(CORSMiddleware, allow_origin_regex=".*", allow_methods=["*"], allow_headers=["*"])])


def serve(searcher: Searcher, port: int, host: str = "127.0.0.1", download: DownloadConfig | None = None) -> None:
    """Serve the page on `host` (loopback by default) until interrupted."""
    import uvicorn

    names = searcher.warm_up()
    shown = f"[{host}]" if ":" in host else host
    print(f"search page on http://{shown}:{port} ({', '.join(names) or 'no index yet'}; Ctrl-C to stop)", flush=True)
    uvicorn.run(search_app(searcher, download), host=host, port=port, log_level="warning")
