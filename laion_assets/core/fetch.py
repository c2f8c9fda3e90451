"""HTTP fetching for the images stage: aiohttp with an SSRF guard, opt-out, limits and retries.

The SSRF guard sits in the resolver: every host name is resolved, every address checked,
and only then does the connector connect, to exactly the checked addresses (no second lookup
an attacker could rebind). IP-literal hosts skip resolvers in aiohttp, so they are checked
before the request. Redirects are followed by hand so each hop passes the same checks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from laion_assets import __version__
from laion_assets.core.config import DownloadConfig

RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}


class AddressRefused(Exception):
    """The URL resolves to an address the SSRF guard does not allow."""


@dataclass(slots=True)
class Fetched:
    status: str  # success | http_error | failed_download | opted_out | refused_address
    error: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    body: bytes | None = None
    retryable: bool = False
    attempts: int = 1


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
    token = f"; {cfg.user_agent_token}" if cfg.user_agent_token else ""
    return f"Mozilla/5.0 (compatible; laion-assets/{__version__}{token}; +{cfg.user_agent_url})"


def opted_out(headers, directives, token: str | None) -> str | None:
    """The X-Robots-Tag directive that forbids use, if any ("noai", "bot: noimageai", ...)."""
    names = {"*", "laion-assets"} | ({token.lower()} if token else set())
    for value in headers.getall("X-Robots-Tag", []):
        for part in value.split(","):
            part = part.strip().lower()
            agent, sep, directive = part.rpartition(":")
            if sep and agent.strip() not in names:
                continue
            # "bot: noai" splits above; "noai" has no agent
            directive = directive.strip() if sep else part
            if directive in directives:
                return part
    return None


class Fetcher:
    """One aiohttp session for a shard: connection reuse, DNS cache, guarded resolver."""

    def __init__(self, cfg: DownloadConfig, resolver: AbstractResolver | None = None):
        self.cfg = cfg
        self.allowed = _networks(cfg.allowed_networks)
        self.directives = {d.lower() for d in cfg.opt_out_directives}
        self._resolver = GuardedResolver(cfg.allowed_networks, inner=resolver)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        cfg = self.cfg
        connector = aiohttp.TCPConnector(
            limit=cfg.concurrency or 0, limit_per_host=cfg.per_host, resolver=self._resolver,
            use_dns_cache=cfg.dns_cache_ttl_s > 0, ttl_dns_cache=cfg.dns_cache_ttl_s or None,
            enable_cleanup_closed=True,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=cfg.total_timeout_s, sock_connect=cfg.connect_timeout_s,
                sock_read=cfg.read_timeout_s,
            ),
            headers={"User-Agent": user_agent(cfg), "Accept": "image/*,*/*;q=0.8"},
            auto_decompress=True,
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def fetch(self, url: str) -> Fetched:
        """Fetch with retries (timeouts, resets, 429, 5xx only) and exponential backoff."""
        result = Fetched("failed_download")
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                await asyncio.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            result = await self._fetch_once(url)
            result.attempts = attempt + 1
            if not result.retryable:
                break
        return result

    async def _fetch_once(self, url: str) -> Fetched:
        cfg = self.cfg
        current = URL(url, encoded=False)
        try:
            for _ in range(cfg.max_redirects + 1):
                if current.scheme not in ("http", "https"):
                    return Fetched("failed_download", f"unsupported scheme in {current}")
                self._check_literal(current.host)
                async with self.session.get(current, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        current = current.join(URL(resp.headers["Location"]))
                        continue
                    return await self._read(resp)
            return Fetched("failed_download", f"more than {cfg.max_redirects} redirects")
        except AddressRefused as e:
            return Fetched("refused_address", str(e))
        except asyncio.TimeoutError:
            return Fetched("failed_download", "timeout", retryable=True)
        except aiohttp.ClientConnectorDNSError as e:
            return Fetched("failed_download", f"dns: {e.os_error}", retryable=True)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError) as e:
            return Fetched("failed_download", f"{type(e).__name__}: {e}", retryable=True)
        except (aiohttp.ClientError, ValueError) as e:
            return Fetched("failed_download", f"{type(e).__name__}: {e}")

    def _check_literal(self, host: str | None) -> None:
        if host is None:
            raise AddressRefused("URL has no host")
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return  # a name: the guarded resolver checks what it resolves to
        check_address(host.strip("[]"), self.allowed)

    async def _read(self, resp: aiohttp.ClientResponse) -> Fetched:
        cfg = self.cfg
        ctype = resp.headers.get("Content-Type")
        if resp.status != 200:
            return Fetched(
                "http_error", f"HTTP {resp.status}", resp.status, ctype,
                retryable=resp.status in RETRYABLE_HTTP,
            )
        directive = opted_out(resp.headers, self.directives, cfg.user_agent_token)
        if directive:
            # Decided on the headers alone: the body is never downloaded.
            resp.close()
            return Fetched("opted_out", f"X-Robots-Tag: {directive}", resp.status, ctype)
        if (resp.content_length or 0) > cfg.max_body_bytes:
            resp.close()
            return Fetched("failed_download", f"body {resp.content_length} B > max_body_bytes", resp.status, ctype)
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > cfg.max_body_bytes:
                resp.close()
                return Fetched("failed_download", f"body > max_body_bytes {cfg.max_body_bytes}", resp.status, ctype)
            chunks.append(chunk)
        return Fetched("success", None, resp.status, ctype, b"".join(chunks))
