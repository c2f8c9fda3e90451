"""The HTTP half of the images stage against a real server on 127.0.0.1: SSRF guard (resolver
stubs decide private addresses without connecting to them), opt-out before the body, user
agent, retries and backoff, timeouts, redirects, body limit, per-host limits, connection reuse."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from laion_assets.core.images.config import DownloadConfig
from laion_assets.core.images.fetch import (
    AddressRefused,
    Fetcher,
    GuardedResolver,
    literal_address,
    opted_out,
    retry_after_s,
)
from laion_assets_tests.faultsite import StubResolver

LOCAL = ("127.0.0.1/32",)


def fetch_all(cfg: DownloadConfig, urls: list[str], resolver=None):
    async def go():
        async with Fetcher(cfg, resolver=resolver) as f:
            return await asyncio.gather(*(f.fetch(u) for u in urls))

    return asyncio.run(go())


def fetch(cfg: DownloadConfig, url: str, resolver=None):
    return fetch_all(cfg, [url], resolver)[0]


def cfg(**kw) -> DownloadConfig:
    base = dict(allowed_networks=LOCAL, retries=0, backoff_s=0.05, connect_timeout_s=2, read_timeout_s=2, total_timeout_s=5)
    base.update(kw)
    return DownloadConfig(**base)


# -- SSRF guard ------------------------------------------------------------------------------

def test_default_guard_refuses_loopback_without_connecting(testsite):
    site, base = testsite
    got = fetch(DownloadConfig(retries=0), f"{base}/img/p0.jpg")
    assert got.status == "refused_address" and "127.0.0.1" in got.error
    before = site.count("/status/200/guard-default")
    assert fetch(DownloadConfig(retries=0), f"{base}/status/200/guard-default").status == "refused_address"
    assert site.count("/status/200/guard-default") == before == 0


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/a.jpg", "http://169.254.169.254/latest/meta-data/", "http://[::1]/a.jpg",
    "http://127.0.0.2/a.jpg", "http://2130706433/a.jpg", "http://127.1/a.jpg", "http://0x7f.1/a.jpg",
    "http://224.0.0.1/a.jpg", "http://0.0.0.0/a.jpg", "http://[fe80::1]/a.jpg", "http://[::ffff:10.0.0.1]/a.jpg",
])
def test_ip_literals_refused_before_connecting(url):
    """IP literals never reach a resolver: they are checked before any connection is made."""
    got = fetch(cfg(allowed_networks=()), url)
    assert got.status == "refused_address", (url, got)


def test_literal_address_forms():
    assert literal_address("2130706433") == "127.0.0.1"
    assert literal_address("[::1]") == "::1"
    assert literal_address("images.example.com") is None
    assert literal_address("cafe.be") is None


@pytest.mark.parametrize("addr", ["10.0.0.1", "169.254.169.254", "192.168.1.5", "100.64.0.1", "fd00::1"])
def test_resolver_refuses_private_and_link_local(addr):
    """A name resolving to a private/link-local address is refused in the resolver, so the
    connector never receives (let alone connects to) the address."""
    stub = StubResolver({"internal.test": addr})
    got = fetch(cfg(), "http://internal.test/a.jpg", resolver=stub)
    assert got.status == "refused_address" and addr in got.error
    assert stub.asked == ["internal.test"]


def test_guarded_resolver_directly():
    stub = StubResolver({"internal.test": "10.0.0.1", "ok.test": "127.0.0.1"})
    guard = GuardedResolver(LOCAL, inner=stub)
    with pytest.raises(AddressRefused):
        asyncio.run(guard.resolve("internal.test", 80))
    assert asyncio.run(guard.resolve("ok.test", 80))[0]["host"] == "127.0.0.1"


def test_names_resolving_to_allowed_network_are_fetched(testsite):
    site, base = testsite
    port = base.rsplit(":", 1)[1]
    stub = StubResolver({"images.test": "127.0.0.1"})
    got = fetch(cfg(), f"http://images.test:{port}/status/200/by-name", resolver=stub)
    assert got.status == "success" and got.body == b"status"
    assert site.count("/status/200/by-name") == 1


def test_redirects_are_checked_on_every_hop(testsite):
    """Allowed 127.0.0.1 redirects to 127.0.0.2 (loopback, not allowed) and to a name the stub
    maps to a private address: both refused before connecting; nothing reaches the target."""
    from urllib.parse import quote

    site, base = testsite
    port = base.rsplit(":", 1)[1]
    stub = StubResolver({"internal.test": "10.0.0.1", "metadata.test": "169.254.169.254"})
    targets = [
        f"http://127.0.0.2:{port}/status/200/hop-a",
        f"http://internal.test:{port}/status/200/hop-b",
        f"http://metadata.test:{port}/latest/meta-data/",
    ]
    for target in targets:
        got = fetch(cfg(), f"{base}/to/{quote(target, safe='')}", resolver=stub)
        assert got.status == "refused_address", (target, got)
    assert site.count("/status/200/hop-a") == site.count("/status/200/hop-b") == 0
    assert "internal.test" in stub.asked and "metadata.test" in stub.asked


def test_only_http_and_https(testsite):
    from urllib.parse import quote

    site, base = testsite
    assert fetch(cfg(), "ftp://127.0.0.1/a.jpg").status == "refused_scheme"
    assert fetch(cfg(), "file:///etc/passwd").status == "refused_scheme"
    got = fetch(cfg(), f"{base}/to/{quote('file:///etc/passwd', safe='')}")
    assert got.status == "refused_scheme" and "file:" in got.error and got.http_status == 302


# -- opt-out ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, token, expected", [
    ("noai", None, "noai"),
    ("noindex, nofollow", None, "noindex"),
    ("NoImageAI", None, "noimageai"),
    ("otherbot: noai", None, None),
    ("googlebot: noindex, noai", None, None),  # both directives are googlebot's
    ("laion-assets: noimageindex", None, "laion-assets: noimageindex"),
    ("mybot: noai", "MyBot", "mybot: noai"),
    ("unavailable_after: 25 Jun 2010 15:00:00 PST", None, None),
    ("nofollow", None, None),
])
def test_x_robots_tag_parsing(value, token, expected):
    from multidict import CIMultiDict

    directives = {"noai", "noimageai", "noindex", "noimageindex"}
    assert opted_out(CIMultiDict({"X-Robots-Tag": value}), directives, token) == expected


def test_opt_out_decided_before_the_body(testsite):
    """The /robots route sends its body slowly (~5 s): an opted-out fetch returns at once."""
    from urllib.parse import quote

    site, base = testsite
    t = time.monotonic()
    got = fetch(cfg(), f"{base}/robots/{quote('noai')}/p1.jpg")
    assert got.status == "opted_out" and got.body is None and "noai" in got.error
    assert time.monotonic() - t < 1.5
    # configurable: with noai not among the directives the image is downloaded
    got = fetch(cfg(opt_out_directives=("noimageai",), total_timeout_s=20, read_timeout_s=5), f"{base}/robots/{quote('otherbot: noimageai')}/p0.jpg")
    assert got.status == "success" and got.body


def test_user_agent_token(testsite):
    site, base = testsite
    fetch(cfg(user_agent_token="mytoken", user_agent_url="https://example.org/bot"), f"{base}/status/204/ua")
    ua = site.user_agents[-1]
    assert ua.startswith("Mozilla/5.0 (compatible; laion-assets/") and ua.endswith("; mytoken; +https://example.org/bot)")


# -- retries, timeouts, redirects, limits ------------------------------------------------------

def test_retryable_failures_are_retried_with_backoff(testsite):
    site, base = testsite
    t = time.monotonic()
    got = fetch(cfg(retries=2, backoff_s=0.2), f"{base}/flaky/1/k1/p0.jpg")
    assert got.status == "success" and got.attempts == 2
    assert time.monotonic() - t >= 0.15  # waited (backoff with +-25% jitter)
    got = fetch(cfg(retries=2, backoff_s=0.01), f"{base}/flaky/5/k2/p0.jpg")
    assert (got.status, got.http_status, got.attempts, got.retryable) == ("http_error", 503, 3, True)
    assert site.count("/flaky/5/k2/p0.jpg") == 3


@pytest.mark.parametrize("code", [404, 403, 410])
def test_permanent_failures_are_not_retried(testsite, code):
    site, base = testsite
    got = fetch(cfg(retries=3), f"{base}/status/{code}/perm")
    assert (got.status, got.http_status, got.attempts, got.retryable) == ("http_error", code, 1, False)
    assert site.count(f"/status/{code}/perm") == 1


def test_read_timeout_is_retryable(testsite):
    site, base = testsite
    t = time.monotonic()
    got = fetch(cfg(read_timeout_s=0.3, retries=1, backoff_s=0.01), f"{base}/stall/t1")
    assert got.status == "failed_download" and got.error == "timeout" and got.retryable and got.attempts == 2
    assert time.monotonic() - t < 2.5
    got = fetch(cfg(read_timeout_s=5, total_timeout_s=0.4), f"{base}/stall/t2")
    assert got.error == "timeout"


def test_connect_failure_is_a_failed_download(testsite):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    got = fetch(cfg(), f"http://127.0.0.1:{port}/a.jpg")
    assert got.status == "failed_download" and got.retryable


def test_redirects_followed_up_to_the_limit(testsite):
    from urllib.parse import quote

    site, base = testsite
    got = fetch(cfg(), f"{base}/to/{quote('/img/p0.jpg', safe='')}")
    assert got.status == "success" and got.body[:2] == b"\xff\xd8"
    got = fetch(cfg(max_redirects=3), f"{base}/loop/0")
    assert got.status == "failed_download" and "more than 3 redirects" in got.error
    assert site.count("/loop/4") == 0 and site.count("/loop/3") == 1


def test_max_body_bytes(testsite):
    site, base = testsite
    size = (site.root / "p1.jpg").stat().st_size
    small = cfg(max_body_bytes=1024)
    for url in (f"{base}/img/p1.jpg", f"{base}/chunked/p1.jpg"):
        got = fetch(small, url)
        assert got.status == "too_large" and "max_body_bytes" in got.error and got.body is None
    got = fetch(cfg(), f"{base}/chunked/p1.jpg")
    assert got.status == "success" and len(got.body) == size


def test_per_host_limit_and_connection_reuse(testsite):
    """30 slow requests to one host with per_host=3: never more than 3 at once, and waiting
    for the host does not count against the total timeout (30 x 0.1 s / 3 = 1 s > 0.8 s)."""
    site, base = testsite
    with site.lock:
        site.max_sleeping = 0  # the site is shared by the whole session
        site.peers.clear()
    urls = [f"{base}/sleep/100/reuse{i}/p0.jpg" for i in range(30)]
    got = fetch_all(cfg(per_host=3, total_timeout_s=0.8), urls)
    assert [g.status for g in got] == ["success"] * 30
    assert site.max_sleeping == 3
    assert len(site.peers) <= 3  # keep-alive: 30 requests over at most 3 connections


def test_retry_after_forms():
    import email.utils

    assert retry_after_s("120") == 120.0
    assert retry_after_s(" 0 ") == 0.0
    in_a_minute = retry_after_s(email.utils.formatdate(time.time() + 60, usegmt=True))
    assert 58 <= in_a_minute <= 60
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no wait
    assert retry_after_s("soon") is None and retry_after_s(None) is None and retry_after_s("-5") is None
