"""The fault corpus: what each hostile input is and the exact status it must get. Built here,
run by test_fault_corpus.py through the real raw_urls and images stages.

A case's URL may use {base} (the test server), {port} and stub host names (see RESOLVE). Its
`status` is the images status, or the raw_urls kept-out reason for rows that never reach the
images stage. `check` asserts more (error text, attempts, pixels) on the case's images row.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageCms

# Host names the resolver stub knows: everything but images.test / the IDNA name is private.
RESOLVE = {
    "images.test": "127.0.0.1", "xn--bcher-kva.test": "127.0.0.1",
    "internal.test": "10.0.0.1", "metadata.test": "169.254.169.254", "home.test": "192.168.1.1",
    "cgnat.test": "100.64.0.1", "ula6.test": "fd00::1", "link6.test": "fe80::1",
}
MAX_BODY = 256 * 1024


@dataclass(frozen=True)
class Case:
    kind: str
    name: str
    url: str | None
    status: str
    check: Callable | None = None  # check(row, site) with the images row as a dict
    caption: str | None = None  # default: "<kind>/<name>" (unique, so every row has its own uid)

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"

    def address(self, base: str, port: str) -> str | None:
        """The input URL on a running server: {base} and {port} filled in; `to:<target>`
        becomes the server's redirect to <target>."""
        if self.url is None:
            return None
        url = self.url.format(base=base, port=port)
        return f"{base}/to/" + quote(url[3:], safe="") if url.startswith("to:") else url


def to(target: str) -> str:
    """A URL on the test server that redirects (302) to `target`."""
    return "to:" + target


def error_has(*parts: str) -> Callable:
    def check(row, site):
        assert all(p in (row["error"] or "") for p in parts), row["error"]
    return check


def all_of(*checks: Callable) -> Callable:
    def check(row, site):
        for c in checks:
            c(row, site)
    return check


def fields(**expected) -> Callable:
    def check(row, site):
        assert {k: row[k] for k in expected} == expected, row
    return check


def waited(low: float, high: float) -> Callable:
    def check(row, site):
        assert low <= row["duration_s"] <= high, row["duration_s"]
    return check


def never_reached(path: str) -> Callable:
    def check(row, site):
        assert site.count(path) == 0, f"{path} was requested"
    return check


def on_the_wire(target: str) -> Callable:
    """The server received exactly this request target (what was sent, byte for byte)."""
    def check(row, site):
        assert target in site.raw_paths, (target, site.raw_paths)
    return check


# -- the odd image modes --------------------------------------------------------------------

W, H = 32, 16  # left half / right half, or a gradient along x
X = np.tile(np.arange(W), (H, 1))
LEFT = X < W // 2


def _grey(v) -> np.ndarray:
    return np.repeat(np.asarray(v, float)[..., None], 3, axis=-1)


def _halves(left, right) -> np.ndarray:
    return np.where(LEFT[..., None], np.asarray(left, float), np.asarray(right, float))


def _on_white(rgb, alpha) -> np.ndarray:
    a = np.asarray(alpha, float)[..., None] / 255
    return np.asarray(rgb, float) * a + 255 * (1 - a)


def _png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit RGB/RGBA PNG written by hand (Pillow cannot write one)."""
    h, w, c = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if c == 3 else 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _image(mode: str, pixels) -> Image.Image:
    """An 8-bit image of that mode from an (H, W[, bands]) array."""
    return Image.frombytes(mode, (W, H), np.ascontiguousarray(pixels, np.uint8).tobytes())


def _palette() -> Image.Image:
    p = _image("P", np.where(LEFT, 0, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    return p


def write_mode_images(root: Path) -> dict[str, np.ndarray | None]:
    """One file per Pillow mode a web image can decode to; returns file -> the RGB pixels it
    must be stored as (None: it must fail). Expected pixels are computed here, from how each
    file was made, not by the code under test."""
    expected: dict[str, np.ndarray | None] = {}

    def save(name: str, img: Image.Image, want, **kw) -> None:
        img.save(root / name, **kw)
        expected[name] = want

    save("mode_1.png", Image.fromarray(~LEFT), _grey(np.where(LEFT, 0, 255)))
    save("mode_l.png", _image("L", X * 8), _grey(X * 8))
    la = Image.merge("LA", [Image.new("L", (W, H), 100), _image("L", np.where(LEFT, 255, 0))])
    save("mode_la.png", la, _halves((100, 100, 100), (255, 255, 255)))
    save("mode_p_transparent.png", _palette(), _halves((255, 0, 0), (255, 255, 255)), transparency=1)
    save("mode_p_transparent.gif", _palette(), _halves((255, 0, 0), (255, 255, 255)), transparency=1)
    alpha = np.where(LEFT, 255, 128)
    rgba = _image("RGBA", np.dstack([np.full((H, W), c) for c in (10, 200, 30)] + [alpha]))
    save("mode_rgba.png", rgba, _on_white(_halves((10, 200, 30), (10, 200, 30)), alpha))
    save("mode_rgba.webp", rgba, _on_white(_halves((10, 200, 30), (10, 200, 30)), alpha), lossless=True)
    cmyk = _image("CMYK", np.where(LEFT[..., None], [255, 0, 0, 0], [0, 0, 0, 255]))
    save("mode_cmyk.jpg", cmyk, _halves((0, 255, 255), (0, 0, 0)), quality=95)
    save("mode_cmyk.tif", cmyk, _halves((0, 255, 255), (0, 0, 0)))
    v16 = X * 2000  # 0..62000
    save("mode_i16.png", Image.fromarray(v16.astype(np.uint16)), _grey(np.rint(v16 / 257)))
    i16b = Image.frombytes("I;16B", (W, H), v16.astype(">u2").tobytes())  # (Pillow's convert to I;16B clips)
    save("mode_i16b.tif", i16b, _grey(np.rint(v16 / 257)))
    save("mode_i32.tif", Image.fromarray(v16.astype(np.int32)), _grey(np.rint(v16 / 257)))
    save("mode_i32_negative.tif", Image.fromarray((v16 - 5000).astype(np.int32)), None)
    f = X / (W - 1)
    save("mode_f.tif", Image.fromarray(f.astype(np.float32)), _grey(np.rint(f * 255)))
    save("mode_f_nan.tif", Image.fromarray(np.where(LEFT, np.nan, f).astype(np.float32)), None)
    rgb16 = np.dstack([v16, 65535 - v16, np.full((H, W), 30000)])
    _png16(root / "mode_rgb16.png", rgb16)
    expected["mode_rgb16.png"] = rgb16 / 257
    alpha16 = np.where(LEFT, 65535, 0)
    _png16(root / "mode_rgba16.png", np.dstack([rgb16, alpha16]))
    expected["mode_rgba16.png"] = _on_white(rgb16 / 257, alpha16 / 257)
    lab = _image("LAB", np.where(LEFT[..., None], [150, 100, 200], [60, 180, 90]))
    to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    save("mode_lab.tif", lab, np.asarray(ImageCms.applyTransform(lab, to_srgb), float))
    ycc = _image("YCbCr", np.where(LEFT[..., None], [120, 110, 150], [200, 128, 128]))
    save("mode_ycbcr.jpg", ycc, np.asarray(ycc.convert("RGB"), float), quality=95)
    return expected


def pixels(expected: np.ndarray, tolerance: int) -> Callable:
    def check(row, site):
        got = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"), float)
        assert got.shape == expected.shape, (got.shape, expected.shape)
        worst = np.abs(got - expected).max()
        assert worst <= tolerance, f"pixels differ by up to {worst} (tolerance {tolerance})"
    return check


# -- decompression bombs: tiny files that claim (or hold) huge images -----------------------

def write_bombs(root: Path) -> None:
    Image.new("1", (12000, 12000)).save(root / "bomb.png")  # 144 Mpx of real pixels in ~20 KB
    small = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(small, "JPEG")
    jpg = bytearray(small.getvalue())
    sof = jpg.find(b"\xff\xc0")
    jpg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)  # the frame header claims 3.6 Gpx
    (root / "bomb.jpg").write_bytes(bytes(jpg))
    for name, kw in (("bomb.webp", {"lossless": True}), ("bomb_lossy.webp", {})):
        small = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 20, 30)).save(small, "WEBP", **kw)
        webp = bytearray(small.getvalue())
        if kw:  # VP8L: 14-bit width-1 and height-1 after the signature byte
            at = webp.find(b"VP8L") + 9
            bits = int.from_bytes(webp[at:at + 4], "little") & ~((1 << 28) - 1)
            webp[at:at + 4] = (bits | 16382 | (16382 << 14)).to_bytes(4, "little")
        else:  # VP8: 14-bit width and height after the start code
            at = webp.find(b"\x9d\x01\x2a") + 3
            webp[at:at + 4] = struct.pack("<HH", 16383, 16383)
        (root / name).write_bytes(bytes(webp))
    small = io.BytesIO()
    Image.new("P", (16, 16)).save(small, "GIF")
    gif = bytearray(small.getvalue())
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen: 4.3 Gpx
    (root / "bomb.gif").write_bytes(bytes(gif))
    (root / "page.html").write_bytes(b"<!DOCTYPE html><html><body>Not an image</body></html>")
    (root / "drawing.svg").write_bytes(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')


# every file write_mode_images makes -> the Pillow mode it decodes to (so each mode is really met)
MODE_FILES = {
    "mode_1.png": "1", "mode_l.png": "L", "mode_la.png": "LA", "mode_p_transparent.png": "P",
    "mode_p_transparent.gif": "P", "mode_rgba.png": "RGBA", "mode_rgba.webp": "RGBA",
    "mode_cmyk.jpg": "CMYK", "mode_cmyk.tif": "CMYK", "mode_i16.png": "I;16", "mode_i16b.tif": "I;16B",
    "mode_i32.tif": "I", "mode_i32_negative.tif": "I", "mode_f.tif": "F", "mode_f_nan.tif": "F",
    "mode_rgb16.png": "RGB", "mode_rgba16.png": "RGBA", "mode_lab.tif": "LAB",
    "mode_ycbcr.jpg": "RGB",  # a YCbCr JPEG: libjpeg hands over RGB
}
FAILING_MODES = ("mode_i32_negative.tif", "mode_f_nan.tif")


def mode_check(name: str, expected: np.ndarray) -> Callable:
    """The stored image (PNG, not resized) has the expected pixels: exact up to rounding, or
    within 10 levels where the source is a JPEG (chroma upsampling blurs the edge between
    the halves)."""
    return pixels(expected, 10 if name.endswith(".jpg") else 1)


def build_cases() -> list[Case]:
    bomb = all_of(error_has("decompression bomb"))
    timeout = all_of(error_has("timeout"), fields(retryable=True))
    cases = [
        # bodies over max_body_bytes (256 KiB)
        Case("body over the cap", "content-length", "{base}/big/400000/cap-a", "too_large",
             all_of(error_has("400000 B > max_body_bytes 262144"), fields(retryable=False, image=None))),
        Case("body over the cap", "chunked", "{base}/bigchunked/400000/cap-b", "too_large", error_has("max_body_bytes 262144 (stopped at")),
        Case("body over the cap", "exactly the cap", "{base}/big/262144/cap-c", "failed_decode"),  # read, then not an image
        Case("gzip bomb", "content-length", "{base}/gzip/5000000/length/gz-a", "too_large", error_has("stopped at")),
        Case("gzip bomb", "chunked", "{base}/gzip/5000000/chunked/gz-b", "too_large", error_has("stopped at")),
        Case("decompression bomb", "png 144 Mpx", "{base}/img/bomb.png", "failed_decode",
             all_of(bomb, fields(original_width=12000, original_height=12000))),
        Case("decompression bomb", "jpeg header 3.6 Gpx", "{base}/img/bomb.jpg", "failed_decode", bomb),
        Case("decompression bomb", "webp lossless 268 Mpx", "{base}/img/bomb.webp", "failed_decode", bomb),
        Case("decompression bomb", "webp lossy 268 Mpx", "{base}/img/bomb_lossy.webp", "failed_decode", bomb),
        Case("decompression bomb", "gif screen 4.3 Gpx", "{base}/img/bomb.gif", "failed_decode", bomb),
        # Retry-After: seconds or HTTP date; waited for up to max_retry_after_s (3 s)
        Case("retry-after", "429 after 1 s", "{base}/retry/429/1/1/ra-a/p0.jpg", "success", all_of(fields(attempts=2), waited(1.0, 6.0))),
        Case("retry-after", "503 at a date 2 s ahead", "{base}/retry/503/in:2/1/ra-b/p0.jpg", "success", all_of(fields(attempts=2), waited(0.9, 6.0))),
        Case("retry-after", "429 after a day", "{base}/retry/429/86400/9/ra-c/p0.jpg", "http_error",
             all_of(fields(http_status=429, attempts=1, retryable=True), error_has("Retry-After 86400 s > max_retry_after_s 3"), waited(0, 2.0))),
        Case("retry-after", "503 at a date a day ahead", "{base}/retry/503/in:86400/9/ra-d/p0.jpg", "http_error",
             all_of(fields(http_status=503, attempts=1, retryable=True), error_has("max_retry_after_s"), waited(0, 2.0))),
        Case("retry-after", "503 unreadable value", "{base}/retry/503/soon/1/ra-e/p0.jpg", "success", fields(attempts=2)),
        Case("retry-after", "429 every time", "{base}/retry/429/0/9/ra-f/p0.jpg", "http_error", fields(http_status=429, attempts=2, retryable=True)),
        # nothing in the body
        Case("empty body", "200 with 0 bytes", "{base}/empty/e-a", "failed_download", all_of(error_has("empty body"), fields(http_status=200))),
        Case("empty body", "204 no content", "{base}/nocontent/e-b", "http_error", fields(http_status=204, retryable=False)),
        # slow and broken servers (read_timeout 1 s, total_timeout 2.5 s)
        Case("slow server", "trickles forever", "{base}/trickle/t-a", "failed_download", all_of(timeout, fields(attempts=2))),
        Case("slow server", "stalls after the headers", "{base}/stall/t-b", "failed_download", timeout),
        Case("slow server", "slow but valid", "{base}/slow/150/p1.jpg", "success", waited(1.0, 6.0)),
        Case("slow server", "closes before Content-Length", "{base}/short/p2.jpg", "failed_download", fields(retryable=True)),
        # redirects (max_redirects 3)
        Case("redirect", "relative", to("/img/p0.jpg"), "success"),
        Case("redirect", "protocol-relative", to("//127.0.0.1:{port}/img/p1.jpg"), "success"),
        Case("redirect", "raw unicode Location", to("/any/café au lait 東京.jpg"), "success",
             on_the_wire("/any/caf%C3%A9%20au%20lait%20%E6%9D%B1%E4%BA%AC.jpg")),
        Case("redirect", "chain past the limit", "{base}/loop/100", "failed_download",
             all_of(error_has("more than 3 redirects"), never_reached("/loop/104"))),
        Case("redirect", "loop", "{base}/pingpong/a", "failed_download", error_has("more than 3 redirects (a loop)")),
    ]
    for scheme, target in [
        ("file", "file:///etc/passwd"), ("ftp", "ftp://127.0.0.1/a.jpg"), ("gopher", "gopher://127.0.0.1:70/1a"),
        ("data", "data:image/png;base64,iVBORw0KGgo="), ("javascript", "javascript:alert(1)"),
        ("ws", "ws://127.0.0.1:{port}/img/p0.jpg"), ("mailto", "mailto:a@example.com"),
    ]:
        cases.append(Case("redirect to a refused scheme", scheme, to(target), "refused_scheme",
                          all_of(error_has(f"redirect to a {scheme}: URL"), fields(http_status=302))))
    for name, host in [
        ("127.0.0.2", "127.0.0.2"), ("127.1.2.3", "127.1.2.3"), ("[::1]", "[::1]"), ("0x7f000002", "0x7f000002"),
        ("2130706434", "2130706434"), ("0.0.0.0", "0.0.0.0"), ("[::ffff:127.0.0.2]", "[::ffff:127.0.0.2]"),
        ("name -> 10.0.0.1", "internal.test"), ("name -> 169.254.169.254", "metadata.test"),
        ("name -> 192.168.1.1", "home.test"), ("name -> 100.64.0.1", "cgnat.test"),
        ("name -> fd00::1", "ula6.test"), ("name -> fe80::1", "link6.test"),
    ]:
        path = f"/status/200/ssrf-{len(cases)}"
        cases.append(Case("redirect to a refused address", name, to(f"http://{host}:{{port}}{path}"), "refused_address", never_reached(path)))
    cases += [
        Case("refused address", "name -> 10.0.0.1", "http://internal.test:{port}/status/200/ssrf-direct", "refused_address",
             all_of(error_has("10.0.0.1"), never_reached("/status/200/ssrf-direct"))),
        Case("refused address", "allowed name -> 127.0.0.1 (control)", "http://images.test:{port}/img/p2.jpg", "success"),
        # what the Content-Type says does not decide (browsers sniff too)
        Case("content type", "plain jpeg (control)", "{base}/img/p0.jpg", "success"),
        Case("content type", "jpeg as text/html", "{base}/ctype/text%2Fhtml/p0.jpg", "success"),
        Case("content type", "jpeg without Content-Type", "{base}/ctype/none/p1.jpg", "success"),
        Case("content type", "jpeg as octet-stream", "{base}/ctype/application%2Foctet-stream/p2.jpg", "success"),
        Case("content type", "png as image/jpeg", "{base}/ctype/image%2Fjpeg/mode_rgba.png", "success"),
        Case("content type", "html as image/jpeg", "{base}/ctype/image%2Fjpeg/page.html", "failed_decode", error_has("HTML")),
        Case("content type", "svg as image/svg+xml", "{base}/ctype/image%2Fsvg%2Bxml/drawing.svg", "failed_decode", error_has("not an image")),
        # input URLs as browsers send them
        Case("url on the wire", "raw spaces", "{base}/any/my photo 01.png", "success", on_the_wire("/any/my%20photo%2001.png")),
        Case("url on the wire", "unicode path", "{base}/any/東京/café.jpg", "success", on_the_wire("/any/%E6%9D%B1%E4%BA%AC/caf%C3%A9.jpg")),
        Case("url on the wire", "encoded, +, (), query, fragment", "{base}/any/a%2Fb+c(1).jpg?q=a b&x=%zz#frag", "success",
             on_the_wire("/any/a%2Fb+c(1).jpg?q=a%20b&x=%zz")),
        Case("url on the wire", "upper-case scheme", "HTTP://127.0.0.1:{port}/any/UPPER.JPG", "success", on_the_wire("/any/UPPER.JPG")),
        Case("url on the wire", "IDNA host", "http://bücher.test:{port}/any/idna.jpg", "success", on_the_wire("/any/idna.jpg")),
        # rows that never reach the images stage (their status is raw_urls' kept-out reason)
        Case("unusable input row", "no URL", None, "missing_url"),
        Case("unusable input row", "ftp URL", "ftp://127.0.0.1/a.jpg", "unsupported_scheme"),
        Case("unusable input row", "space in the host", "http://exa mple.test/a.jpg", "malformed_url"),
        Case("unusable input row", "protocol-relative", "//127.0.0.1/a.jpg", "malformed_url"),
        Case("unusable input row", "duplicate (url, caption)", "{base}/img/p0.jpg", "duplicate_uid",
             caption="content type/plain jpeg (control)"),
    ]
    for name in MODE_FILES:  # pixels are checked against write_mode_images' expectations
        failing = name in FAILING_MODES
        cases.append(Case("odd image mode", name, "{base}/img/" + name, "failed_decode" if failing else "success",
                          error_has("pixels") if failing else None))
    return cases
