"""Who is calling: the peer address for the audit log, and browser requests that are refused.

A proxy on localhost that holds a credential must not be usable by web pages the local user
happens to open: not by DNS rebinding (a foreign Host name), not by a cross-site form or fetch.
"""

from __future__ import annotations

import functools
from urllib.parse import urlsplit

from starlette.types import Scope

from proxy.errors import ProxyError
from proxy.settings import is_loopback

__all__ = ["check_caller", "peer_address"]

_OTHER_SITES = (b"cross-site", b"same-site")


def peer_address(scope: Scope) -> str:
    """The TCP peer's address, or `unknown` when the server does not report one."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


@functools.lru_cache(maxsize=64)
def _is_loopback_host(host: bytes) -> bool:
    # A handful of Host values arrive over and over: parse each once.
    return is_loopback(urlsplit("//" + host.decode("latin-1")).hostname or "")


def _origin_host(origin: bytes) -> bytes:
    # `Origin: null` (sandboxed pages, files) has no host and so never matches.
    return urlsplit(origin.decode("latin-1")).netloc.encode("latin-1")


def check_caller(scope: Scope, *, loopback_listener: bool) -> None:
    """Refuse foreign Host names on a loopback listener, and requests from other web sites."""
    host = origin = fetch_site = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
        elif name == b"origin":
            origin = value
        elif name == b"sec-fetch-site":
            fetch_site = value.strip().lower()
    if loopback_listener and host is not None and not _is_loopback_host(host):
        raise ProxyError(
            400,
            "BAD_REQUEST",
            "The Host header must name this machine (localhost or a loopback address).",
        )
    if fetch_site in _OTHER_SITES or (origin is not None and _origin_host(origin) != host):
        raise ProxyError(
            403,
            "FORBIDDEN",
            "Requests from web pages on other sites are refused; call the proxy from servers.",
            decision="denied",
        )
