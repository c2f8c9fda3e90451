"""A hostile HTTP server on 127.0.0.1 for the fetch, download and fault-corpus tests: every
fault a crawl meets is a route. Also a resolver stub that maps test host names to fixed
addresses, so SSRF cases are decided without DNS and without connecting."""

from __future__ import annotations

import email.utils
import functools
import gzip
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from aiohttp.abc import AbstractResolver


class SiteState:
    """State shared by the handler threads: request counts per path, connections, UAs."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.Lock()
        self.hits: Counter = Counter()
        self.flaky: Counter = Counter()
        self.inflight = 0
        self.max_inflight = 0
        self.sleeping = 0
        self.max_sleeping = 0  # concurrency seen by the /sleep route
        self.peers: set = set()
        self.user_agents: list[str] = []
        self.raw_paths: list[str] = []  # request targets of /any/, as sent on the wire

    def count(self, path: str) -> int:
        with self.lock:
            return self.hits[path]


@functools.lru_cache(maxsize=4)
def _gzipped_zeros(n: int) -> bytes:
    return gzip.compress(b"\0" * n)


class Handler(BaseHTTPRequestHandler):
    """Routes (path segments):
    /img/<file>                     the file
    /any/<anything>                 p0.jpg, whatever the path; the raw request target is recorded
    /ctype/<quoted type|none>/<file>  the file with that Content-Type (none: no header)
    /robots/<quoted value>/<file>   the file with X-Robots-Tag: <value>, body sent slowly
    /flaky/<n>/<key>/<file>         503 (Retry-After: 0) the first n times per key, then the file
    /retry/<code>/<after>/<n>/<key>/<file>  <code> with Retry-After <after> the first n times per
                                    key, then the file; <after> "in:<s>" is an HTTP date s seconds ahead
    /status/<code>/<key>            that status
    /nocontent/<key>                204 without a body
    /empty/<key>                    200 with a zero-byte body
    /big/<bytes>/<key>              200 with that many bytes and a Content-Length
    /bigchunked/<bytes>/<key>       the same without Content-Length (chunked)
    /gzip/<bytes>/<length|chunked>/<key>  <bytes> zeros gzip-encoded (Content-Encoding: gzip),
                                    with the compressed Content-Length or chunked
    /short/<file>                   Content-Length 1000 more than the file, then the connection closes
    /slow/<ms>/<file>               the file in 8 pieces, <ms> apart (slow but valid)
    /trickle/<key>                  headers, then one byte every 0.2 s, forever
    /sleep/<ms>/<key>/<file>        the file after a delay (counts concurrency)
    /stall/<key>                    headers, then a body that never finishes
    /chunked/<file>                 the file without Content-Length (chunked)
    /to/<quoted url>                302 to that URL (Location sent as UTF-8)
    /loop/<n>                       302 to /loop/<n+1>, forever
    /pingpong/<a|b>                 302 from a to b and back
    """

    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable
    site: SiteState

    def log_message(self, *args) -> None:
        pass

    def _head(self, code: int, headers: dict) -> None:
        self.send_response(code)
        for k, v in headers.items():
            if v is not None:
                self.send_header(k, v)
        self.end_headers()

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, ctype="image/jpeg") -> None:
        self._head(code, {"Content-Type": ctype, "Content-Length": str(len(body)), **(headers or {})})
        self.wfile.write(body)

    def _chunked(self, body: bytes, headers: dict, piece: int = 8192, pause: float = 0.0) -> None:
        self._head(200, {"Transfer-Encoding": "chunked", **headers})
        for i in range(0, len(body), piece):
            part = body[i:i + piece]
            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.flush()
            time.sleep(pause)
        self.wfile.write(b"0\r\n\r\n")

    def _file(self, name: str) -> bytes:
        return (self.site.root / Path(name).name).read_bytes()

    def do_GET(self) -> None:
        site = self.site
        path = self.path.split("?", 1)[0]
        parts = path.lstrip("/").split("/")
        with site.lock:
            site.hits[path] += 1
            site.peers.add(self.client_address)
            site.user_agents.append(self.headers.get("User-Agent", ""))
            site.inflight += 1
            site.max_inflight = max(site.max_inflight, site.inflight)
        try:
            self._route(parts)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with site.lock:
                site.inflight -= 1

    def _first_times(self, n: int, key: str) -> bool:
        with self.site.lock:
            self.site.flaky[key] += 1
            return self.site.flaky[key] <= n

    def _route(self, parts: list[str]) -> None:  # noqa: C901 (one branch per route)
        kind = parts[0]
        if kind == "img":
            self._send(200, self._file(parts[1]))
        elif kind == "any":
            with self.site.lock:
                self.site.raw_paths.append(self.path)
            self._send(200, self._file("p0.jpg"))
        elif kind == "ctype":
            ctype = unquote(parts[1])
            body = self._file(parts[2])
            self._head(200, {"Content-Type": None if ctype == "none" else ctype, "Content-Length": str(len(body))})
            self.wfile.write(body)
        elif kind == "robots":
            body = self._file(parts[2]) * 20
            self._head(200, {"Content-Type": "image/jpeg", "Content-Length": str(len(body)), "X-Robots-Tag": unquote(parts[1])})
            self.wfile.flush()
            for i in range(0, len(body), 4096):  # slowly: a client reading it would take ~seconds
                self.wfile.write(body[i:i + 4096])
                time.sleep(0.05)
        elif kind == "flaky":
            if self._first_times(int(parts[1]), parts[2]):
                self._send(503, b"busy", {"Retry-After": "0"}, "text/plain")
            else:
                self._send(200, self._file(parts[3]))
        elif kind == "retry":
            code, after, n, key, name = int(parts[1]), unquote(parts[2]), int(parts[3]), parts[4], parts[5]
            if after.startswith("in:"):
                after = email.utils.formatdate(time.time() + float(after[3:]), usegmt=True)
            if self._first_times(n, key):
                self._send(code, b"slow down", {"Retry-After": after}, "text/plain")
            else:
                self._send(200, self._file(name))
        elif kind == "status":
            self._send(int(parts[1]), b"status", ctype="text/plain")
        elif kind == "nocontent":
            self._head(204, {})
        elif kind == "empty":
            self._send(200, b"")
        elif kind == "big":
            self._send(200, b"\xff\xd8\xff" + b"\0" * (int(parts[1]) - 3))
        elif kind == "bigchunked":
            self._chunked(b"\xff\xd8\xff" + b"\0" * (int(parts[1]) - 3), {"Content-Type": "image/jpeg"}, piece=65536)
        elif kind == "gzip":
            body = _gzipped_zeros(int(parts[1]))
            headers = {"Content-Type": "image/png", "Content-Encoding": "gzip"}
            if parts[2] == "length":
                self._send(200, body, headers, "image/png")
            else:
                self._chunked(body, headers)
        elif kind == "short":
            body = self._file(parts[1])
            self._head(200, {"Content-Type": "image/jpeg", "Content-Length": str(len(body) + 1000), "Connection": "close"})
            self.wfile.write(body)
            self.close_connection = True
        elif kind == "slow":
            body = self._file(parts[2])
            self._chunked(body, {"Content-Type": "image/jpeg"}, piece=len(body) // 8 + 1, pause=int(parts[1]) / 1000)
        elif kind == "trickle":
            self._head(200, {"Content-Type": "image/jpeg", "Content-Length": "100000"})
            end = time.monotonic() + 60
            while time.monotonic() < end:
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.2)
        elif kind == "sleep":
            with self.site.lock:
                self.site.sleeping += 1
                self.site.max_sleeping = max(self.site.max_sleeping, self.site.sleeping)
            time.sleep(int(parts[1]) / 1000)
            with self.site.lock:
                self.site.sleeping -= 1
            self._send(200, self._file(parts[3]))
        elif kind == "stall":
            self._head(200, {"Content-Type": "image/jpeg", "Content-Length": "100000"})
            self.wfile.write(b"\xff\xd8\xff")
            self.wfile.flush()
            time.sleep(3)
        elif kind == "chunked":
            self._chunked(self._file(parts[1]), {"Content-Type": "image/jpeg"})
        elif kind == "to":
            # The Location header goes out as UTF-8 bytes (http.server would send latin-1).
            location = unquote(parts[1]).encode().decode("latin-1")
            self._send(302, b"", {"Location": location}, "text/plain")
        elif kind == "loop":
            self._send(302, b"", {"Location": f"/loop/{int(parts[1]) + 1}"}, "text/plain")
        elif kind == "pingpong":
            self._send(302, b"", {"Location": "/pingpong/" + ("b" if parts[1] == "a" else "a")}, "text/plain")
        else:
            self._send(404, b"not found", ctype="text/plain")


class FaultServer:
    """The routes above over the files in `root`, on 127.0.0.1:`port` (0: any free port)."""

    def __init__(self, root: Path, port: int = 0):
        self.site = SiteState(root)
        handler = type("H", (Handler,), {"site": self.site})
        server = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 256})  # listen backlog (default 5)
        self.httpd = server(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def testsite(tmp_path_factory):
    """A keep-alive test server on 127.0.0.1 serving a few real JPEGs (yields (site, base_url))."""
    from PIL import Image

    root = tmp_path_factory.mktemp("testsite")
    for i, size in enumerate([(320, 240), (640, 480), (200, 300)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(root / f"p{i}.jpg", quality=90)
    server = FaultServer(root)
    yield server.site, server.base_url
    server.close()


class StubResolver(AbstractResolver):
    """Maps test host names to fixed addresses (no DNS traffic); records what it was asked."""

    def __init__(self, table: dict[str, str]):
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"stub resolver: unknown host {host}")
        addr = self.table[host]
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        return [{"hostname": host, "host": addr, "port": port, "family": fam, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass
