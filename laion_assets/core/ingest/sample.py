"""The bundled sample: real photos from scikit-image plus generated images, served by a small
HTTP server on 127.0.0.1 with the faults real crawls meet (404, 500, HTML, truncated JPEG,
opt-out header, redirect). Used by the demo and by the tests.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from laion_assets.core.lake.errors import LaionAssetsError

PHOTOS = {
    "astronaut": "a portrait of an astronaut in a white spacesuit with the flag",
    "coffee": "a cup of coffee on a saucer, seen from above",
    "chelsea": "a ginger tabby cat looking at the camera",
    "rocket": "a rocket on the launch pad against a blue sky",
    "immunohistochemistry": "a microscope image of stained tissue",
    "hubble_deep_field": "the hubble deep field full of distant galaxies",
    "retina": "a photo of a human retina with blood vessels",
    "colorwheel": "a color wheel with all hues",
    "camera": "a black and white photo of a cameraman with a tripod",
    "moon": "a grey photo of the surface of the moon",
    "coins": "old coins on a dark background",
    "clock": "a wall clock photographed at an angle",
    "brick": "a brick wall texture",
    "grass": "a close-up of green grass",
    "logo": "a logo with transparency",
}
SIZES = ((96, 64), (320, 240), (640, 480), (1200, 800))
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# Fast encoder settings: the demo writes ~300 images of up to 1400x1000 before it starts, and
# the default PNG and WebP effort took most of that (~15 s of 26 s on 2 cores).
FAST = {"PNG": {"compress_level": 1}, "WEBP": {"method": 0}}


def _photo(name: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    return Image.fromarray(arr)


def _generated(i: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 1, (3, 3)).astype(np.float32)
    img = np.stack([x / w, y / h, np.sin((x + y) / (7 + i % 13))], -1) @ c.T  # three channels, one sine
    img = (img - img.min()) / (np.ptp(img) + 1e-6) * 255
    return Image.fromarray(img.astype(np.uint8))


@dataclass
class Sample:
    site: Path  # files the server serves
    rows: pl.DataFrame  # url, caption, WIDTH, HEIGHT, LICENSE (LAION-like columns)


def build_site(site: Path, n_generated: int = 120, seed: int = 0) -> list[dict]:
    """Write the sample images; returns one entry per image: path, caption, width, height."""
    site.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for p_i, (name, caption) in enumerate(PHOTOS.items()):
        photo = _photo(name)
        for s_i, size in enumerate(SIZES):
            ext = list(FORMATS)[(p_i + s_i) % 3]
            img = photo.copy()
            img.thumbnail(size)
            if ext == "jpg" and img.mode not in ("RGB", "L"):
                img = img.convert("RGB")
            fname = f"{name}_{img.width}x{img.height}.{ext}"
            img.save(site / fname, FORMATS[ext], **({"quality": 90} if ext != "png" else {}))
            entries.append({"file": fname, "caption": caption, "width": img.width, "height": img.height})
    for i in range(n_generated):
        size = (int(rng.integers(48, 1400)), int(rng.integers(48, 1000)))
        ext = list(FORMATS)[i % 3]
        fname = f"generated_{i:04d}.{ext}"
        _generated(i, rng, size).save(site / fname, FORMATS[ext], **FAST.get(FORMATS[ext], {}))
        entries.append({"file": fname, "caption": f"a synthetic abstract pattern number {i}", "width": size[0], "height": size[1]})
    return entries


def sample_rows(entries: list[dict], base_url: str) -> pl.DataFrame:
    """A LAION-style shard: every image, each fault kind once or more, and unusable rows."""
    rows = [
        {"URL": f"{base_url}/img/{e['file']}", "TEXT": e["caption"], "WIDTH": e["width"], "HEIGHT": e["height"], "LICENSE": "?"}
        for e in entries
    ]
    jpgs = [e["file"] for e in entries if e["file"].endswith(".jpg")][:4]
    faults = (
        [f"{base_url}/missing/gone_{i}.jpg" for i in range(4)]
        + [f"{base_url}/error/broken_{i}.jpg" for i in range(3)]
        + [f"{base_url}/html/page_{i}.jpg" for i in range(3)]
        + [f"{base_url}/truncated/{f}" for f in jpgs[:2]]
        + [f"{base_url}/noai/{f}" for f in jpgs[2:4]]
        + [f"{base_url}/redirect/{f}" for f in jpgs[:2]]
    )
    rows += [{"URL": u, "TEXT": f"fault case {u.rsplit('/', 2)[1]}", "WIDTH": None, "HEIGHT": None, "LICENSE": "?"} for u in faults]
    rows += [
        {"URL": None, "TEXT": "a row without a url", "WIDTH": None, "HEIGHT": None, "LICENSE": "?"},
        {"URL": "ftp://example.invalid/a.jpg", "TEXT": "an ftp url", "WIDTH": None, "HEIGHT": None, "LICENSE": "?"},
    ]
    return pl.DataFrame(rows, schema={"URL": pl.String, "TEXT": pl.String, "WIDTH": pl.Int64, "HEIGHT": pl.Int64, "LICENSE": pl.String})


class _Handler(BaseHTTPRequestHandler):
    site: Path

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        parts = self.path.lstrip("/").split("/", 1)
        kind, name = (parts + [""])[:2]
        file = (self.site / Path(name).name) if name else None
        ctype = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}.get(name.rsplit(".", 1)[-1], "application/octet-stream")
        if kind == "missing" or (kind in ("img", "truncated", "noai", "redirect") and not (file and file.is_file())):
            self._send(404, b"<html><body>404 Not Found</body></html>", "text/html")
        elif kind == "error":
            self._send(500, b"<html><body>500 Internal Server Error</body></html>", "text/html")
        elif kind == "html":
            self._send(200, b"<!DOCTYPE html><html><body>Not an image</body></html>", "text/html; charset=utf-8")
        elif kind == "img":
            self._send(200, file.read_bytes(), ctype)
        elif kind == "truncated":
            data = file.read_bytes()
            self._send(200, data[: len(data) // 2], ctype)
        elif kind == "noai":
            self._send(200, file.read_bytes(), ctype, {"X-Robots-Tag": "noai"})
        elif kind == "redirect":
            self._send(302, b"", "text/plain", {"Location": f"/img/{name}"})
        else:
            self._send(404, b"not found", "text/plain")

    do_HEAD = do_GET


class SampleServer:
    """Serves a sample site on 127.0.0.1 (port 0 = any free port) in a background thread."""

    def __init__(self, site: Path, port: int = 0):
        handler = type("Handler", (_Handler,), {"site": Path(site)})
        try:
            self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError as e:
            raise LaionAssetsError(f"cannot serve the sample on 127.0.0.1:{port} ({e.strerror}): pass another --port") from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> SampleServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# Captions in other languages and without one, so the demo shows LAION-5B's language split.
OTHER_CAPTIONS = (
    "Ein Porträt eines Astronauten im weißen Raumanzug", "Une tasse de café sur une soucoupe, vue de dessus",
    "木の椅子で眠る茶色の猫", "Un cohete en la plataforma de lanzamiento bajo un cielo azul",
    "Красивая кирпичная стена крупным планом", "IMG_2034.JPG", "DSC_0042.jpg", "_MG_4471",
)


def mix_languages(rows: pl.DataFrame, every: int = 3) -> pl.DataFrame:
    """Every `every`-th caption replaced by one in another language or with none."""
    texts = [OTHER_CAPTIONS[(i // every) % len(OTHER_CAPTIONS)] if i % every == 1 else t for i, t in enumerate(rows["TEXT"].to_list())]
    return rows.with_columns(TEXT=pl.Series(texts, dtype=pl.String))


def write_demo_shard(root: Path, base_url: str, n_generated: int = 120) -> Path:
    """Build the site (once) and the input shard pointing at `base_url`; returns the shard file."""
    site = root / "site"
    manifest = site / "manifest.json"
    if manifest.is_file():
        entries = json.loads(manifest.read_text())
    else:
        entries = build_site(site, n_generated)
        manifest.write_text(json.dumps(entries))
    inputs = root / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    shard = inputs / "demo-00000.parquet"
    mix_languages(sample_rows(entries, base_url)).write_parquet(shard)
    return shard



