"""URLs as browsers read them: the WHATWG URL Standard, through ada-url (the parser Node.js uses).

A row's URL is kept exactly as given (LAION's uid hashes that string); what we fetch is its
WHATWG serialisation: leading/trailing spaces and inner tabs/newlines dropped, spaces and
non-ASCII percent-encoded, existing %-sequences kept, hosts IDNA-encoded and lower-cased,
legacy IPv4 forms (`0x7f.1`, `2130706433`) made canonical. A redirect's `Location` (relative,
protocol-relative, raw unicode) is resolved against the URL that redirected, the same way.
"""

from __future__ import annotations

import re

from ada_url import join_url, normalize_url

FETCHABLE = ("http", "https")
_SCHEME = re.compile(r"^\s*([A-Za-z][A-Za-z0-9+.-]*):")


class BadURL(ValueError):
    """A URL we do not fetch: `reason` is one of raw_urls' kept-out reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def scheme_of(href: str) -> str:
    return href.split(":", 1)[0].lower()


def fetchable(url: str | None) -> str:
    """The WHATWG serialisation of an http(s) URL, or BadURL saying why not."""
    if url is None or not url.strip():
        raise BadURL("missing_url", "no URL")
    try:
        href = normalize_url(url)
    except ValueError:
        m = _SCHEME.match(url)
        if m and m.group(1).lower() not in FETCHABLE:
            raise BadURL("unsupported_scheme", f"scheme '{m.group(1).lower()}'") from None
        why = "no scheme: not an absolute URL" if not m else "not a valid URL (WHATWG parser)"
        raise BadURL("malformed_url", why) from None
    scheme = scheme_of(href)
    if scheme not in FETCHABLE:
        raise BadURL("unsupported_scheme", f"scheme '{scheme}'")
    return href


def resolve(base: str, location: str) -> str:
    """A redirect target resolved against the URL that redirected (any scheme; BadURL if the
    result is not a URL at all)."""
    if any("\udc80" <= c <= "\udcff" for c in location):
        # bytes that were not UTF-8 (decoded with surrogateescape): percent-encode them, as
        # browsers do with a Location they cannot read as UTF-8
        raw = location.encode("utf-8", "surrogateescape")
        location = "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in raw)
    try:
        return join_url(base, location)
    except ValueError:
        raise BadURL("malformed_url", f"redirect Location {location[:100]!r} is not a valid URL") from None
