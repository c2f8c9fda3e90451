"""HTTP fetching for the images stage: aiohttp with an SSRF guard, opt-out, limits and retries.

The SSRF guard sits in the resolver: every host name is resolved, every address checked,
and only then does the connector connect, to exactly the checked addresses (no second lookup
an attacker could rebind). IP-literal hosts skip resolvers in aiohttp, so they are checked
before the request (legacy numeric forms such as `2130706433` or `127.1` included).
Redirects are followed by hand so each hop passes the same checks; a hop to another scheme
(file:, ftp:, data: ...) is refused by policy (`refused_scheme`), like a private address
(`refused_address`). URLs (and each `Location`) are parsed the WHATWG way (core.urls) and
handed to aiohttp already encoded, so they are sent as a browser would send them.

Concurrency: the caller bounds the total in flight; the Fetcher bounds requests per host with
its own semaphores, taken *before* a request's clock starts, so waiting for a busy host never
counts against the timeouts (aiohttp's own `limit_per_host` queue does count, and turns a
shard with many URLs of one host into spurious timeouts).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import ipaddress
import random
import re
import socket
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import timezone

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from laion_assets import __version__
from laion_assets.core.images.config import DownloadConfig
from laion_assets.core.ingest.urls import (
    FETCHABLE,
    BadURL,
    fetchable,
    resolve,
    scheme_of,
)

RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
REDIRECTS = {301, 302, 303, 307, 308}
# X-Robots-Tag directives that take a value after a colon: not user-agent prefixes.
_VALUED = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
_AGENT = re.compile(r"^\s*([a-z0-9_.*-]+)\s*:\s*(.*)$")


class AddressRefused(Exception):
    """The URL resolves to an address the SSRF guard does not allow."""


@dataclass(slots=True)
class Fetched:
    status: str  # success | http_error | failed_download | too_large | opted_out | refused_address | refused_scheme
    error: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    body: bytes | None = None
    retryable: bool = False
    attempts: int = 1
    retry_after: float | None = None
    digests: tuple[str, str, str] | None = None  # md5, sha1, sha256 of the body, taken as it streamed in


def _networks(cidrs) -> list[ipaddress._BaseNetwork]:
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def check_address(addr: str, allowed) -> None:
    """Raise AddressRefused unless `addr` is a public unicast address or explicitly allowed."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allowed):
        return
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        raise AddressRefused(f"{addr} is not a public address (SSRF guard)")


def literal_address(host: str) -> str | None:
    """The address an IP-literal host names (canonical or legacy numeric IPv4), else None."""
    h = host.strip("[]")
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-Fx.]+", h) and not h.endswith("."):
        try:
            return socket.inet_ntoa(socket.inet_aton(h))  # 2130706433, 127.1, 0x7f.1 ...
        except OSError:
            return None
    return None


class GuardedResolver(AbstractResolver):
    """Resolves with `inner` (the system resolver by default) and refuses non-public addresses."""

    def __init__(self, allowed_networks=(), inner: AbstractResolver | None = None):
        self.allowed = _networks(allowed_networks)
        self.inner = inner or aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        infos = await self.inner.resolve(host, port, family)
        for info in infos:
            check_address(info["host"], self.allowed)
        return infos

    async def close(self) -> None:
        await self.inner.close()


def user_agent(cfg: DownloadConfig) -> str:
    """`Mozilla/5.0 (compatible; laion-assets/<v>; <token>; +<url>)`: sites can name the token."""
    token = f"; {cfg.user_agent_token}" if cfg.user_agent_token else ""
    return f"Mozilla/5.0 (compatible; laion-assets/{__version__}{token}; +{cfg.user_agent_url})"


def opted_out(headers, directives, token: str | None) -> str | None:
    """The X-Robots-Tag directive that forbids use, if any ("noai", "bot: noimageai", ...).

    Directives without a user-agent prefix apply to everyone; `agent: d1, d2` applies d1 and
    d2 to that agent only (Google's syntax), and we listen to `*`, `laion-assets` and the
    configured user-agent token."""
    names = {"*", "laion-assets"} | ({token.lower()} if token else set())
    for value in headers.getall("X-Robots-Tag", []):
        agent = None
        for part in value.split(","):
            part = part.strip().lower()
            m = _AGENT.match(part)
            if m and m.group(1) not in _VALUED:
                agent, directive = m.group(1), m.group(2).strip()
            else:
                directive = part
            if agent is not None and agent not in names:
                continue
            if directive in directives:
                return part
    return None


def retry_after_s(value: str | None) -> float | None:
    """Seconds a `Retry-After` asks for: delay-seconds or an HTTP date (RFC 9110), else None."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - time.time())


class Fetcher:
    """One aiohttp session for a shard: connection reuse, DNS cache, guarded resolver,
    per-host limits, timeouts per attempt (connect, read, total incl. redirects)."""

    def __init__(self, cfg: DownloadConfig, resolver: AbstractResolver | None = None, seconds: Counter | None = None):
        self.cfg = cfg
        self.allowed = _networks(cfg.allowed_networks)
        self.directives = {d.lower() for d in cfg.opt_out_directives}
        self._resolver = GuardedResolver(cfg.allowed_networks, inner=resolver)
        self._hosts: dict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(cfg.per_host))
        self.session: aiohttp.ClientSession | None = None
        self.seconds = Counter() if seconds is None else seconds  # "digests": time spent hashing bodies

    async def __aenter__(self) -> Fetcher:
        cfg = self.cfg
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0,  # bounded by the caller and by self._hosts, not queued here
            resolver=self._resolver,
            use_dns_cache=cfg.dns_cache_ttl_s > 0, ttl_dns_cache=cfg.dns_cache_ttl_s or None,
            enable_cleanup_closed=True, keepalive_timeout=30,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s,
            ),
            headers={"User-Agent": user_agent(cfg), "Accept": "image/*,*/*;q=0.8"},
            auto_decompress=True,
            trust_env=False,  # no proxies from the environment: the guard must see the real peer
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def fetch(self, url: str) -> Fetched:
        """Fetch the WHATWG form of `url` with retries (timeouts, resets, 429, 5xx only) and
        exponential backoff with jitter. A `Retry-After` (seconds or HTTP date) is waited for
        up to `max_retry_after_s`; a longer one ends the fetch at once, still retryable, so
        `--retry-failures` picks the row up later."""
        try:
            href = fetchable(url)
        except BadURL as e:
            status = "refused_scheme" if e.reason == "unsupported_scheme" else "failed_download"
            return Fetched(status, f"{e.reason}: {e.detail}", attempts=0)
        cfg = self.cfg
        result = Fetched("failed_download")
        for attempt in range(cfg.retries + 1):
            if attempt:
                delay = cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.75, 1.25)
                await asyncio.sleep(max(delay, result.retry_after or 0.0))
            result = await self._fetch_once(href)
            result.attempts = attempt + 1
            if not result.retryable:
                break
            if result.retry_after is not None and result.retry_after > cfg.max_retry_after_s:
                result.error += f", Retry-After {result.retry_after:.0f} s > max_retry_after_s {cfg.max_retry_after_s:g}"
                break
        return result

    async def _fetch_once(self, href: str) -> Fetched:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        deadline = None
        visited = [href]
        try:
            for _ in range(cfg.max_redirects + 1):
                current = URL(visited[-1], encoded=True)  # already WHATWG-encoded: sent as is
                host = self._check_literal(current.raw_host)
                async with self._hosts[host]:
                    if deadline is None:  # the clock starts once a slot is ours
                        deadline = loop.time() + cfg.total_timeout_s
                    async with asyncio.timeout_at(deadline):
                        async with self.session.get(current, allow_redirects=False) as resp:
                            if resp.status in REDIRECTS and "Location" in resp.headers:
                                target = resolve(visited[-1], resp.headers["Location"])
                                if scheme_of(target) not in FETCHABLE:
                                    return Fetched(
                                        "refused_scheme", f"redirect to a {scheme_of(target)}: URL (only http/https are fetched)",
                                        resp.status,
                                    )
                                visited.append(target)
                                continue
                            return await self._read(resp)
            loop_note = " (a loop)" if len(set(visited)) < len(visited) else ""
            return Fetched("failed_download", f"more than {cfg.max_redirects} redirects{loop_note}")
        except AddressRefused as e:
            return Fetched("refused_address", str(e))
        except BadURL as e:
            return Fetched("failed_download", e.detail)
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            return Fetched("failed_download", "timeout", retryable=True)
        except aiohttp.ClientConnectorDNSError as e:
            return Fetched("failed_download", f"dns: {e.os_error}", retryable=True)
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as e:
            return Fetched("failed_download", f"tls: {type(e).__name__}")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError) as e:
            return Fetched("failed_download", f"{type(e).__name__}: {e}"[:200], retryable=True)
        except (aiohttp.ClientError, ValueError, UnicodeError) as e:
            return Fetched("failed_download", f"{type(e).__name__}: {e}"[:200])

    def _check_literal(self, host: str | None) -> str:
        """Refuse a disallowed IP-literal host before any connection; returns the host key."""
        if not host:
            raise AddressRefused("URL has no host")
        addr = literal_address(host)
        if addr is not None:
            check_address(addr, self.allowed)
        return host.lower()

    async def _read(self, resp: aiohttp.ClientResponse) -> Fetched:
        cfg = self.cfg
        ctype = resp.headers.get("Content-Type")
        if resp.status != 200:
            retryable = resp.status in RETRYABLE_HTTP
            return Fetched(
                "http_error", f"HTTP {resp.status}", resp.status, ctype, retryable=retryable,
                retry_after=retry_after_s(resp.headers.get("Retry-After")) if retryable else None,
            )
        directive = opted_out(resp.headers, self.directives, cfg.user_agent_token)
        if directive:
            # Decided on the headers alone: the body is never read (the connection is dropped).
            resp.close()
            return Fetched("opted_out", f"X-Robots-Tag: {directive}", resp.status, ctype)
        length = resp.content_length
        if length is not None and length > cfg.max_body_bytes:
            resp.close()
            return Fetched("too_large", f"body {length} B > max_body_bytes {cfg.max_body_bytes}", resp.status, ctype)
        # md5, sha1 and sha256 (what hash blocklists come in) over each chunk as it arrives: one
        # pass while the bytes are in cache, and the decode worker never hashes them again.
        hashes, chunks, size = (hashlib.md5(), hashlib.sha1(), hashlib.sha256()), [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > cfg.max_body_bytes:  # counts decoded bytes: gzip bombs stop here too
                resp.close()
                return Fetched("too_large", f"body > max_body_bytes {cfg.max_body_bytes} (stopped at {size} B)", resp.status, ctype)
            chunks.append(chunk)
            t = time.perf_counter()
            for h in hashes:
                h.update(chunk)
            self.seconds["digests"] += time.perf_counter() - t
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not body:
            return Fetched("failed_download", "empty body (HTTP 200, 0 bytes)", resp.status, ctype)
        return Fetched("success", None, resp.status, ctype, body, digests=tuple(h.hexdigest() for h in hashes))
