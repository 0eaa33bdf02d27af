"""Who is calling: refused browser requests and foreign Host names, then the client key.

A proxy that holds a credential must not be usable by web pages the local user happens to
open: not by DNS rebinding (a foreign Host name), not by a cross-site form or fetch. Then,
with client keys configured, each app proves who it is with its own key (`clients`).
"""

from __future__ import annotations

import functools
from urllib.parse import urlsplit

from starlette.types import Scope

from proxy import errors
from proxy.config.settings import is_loopback
from proxy.stages.clients import Client, ClientKeys

__all__ = ["check_caller", "identify", "peer_address"]


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
        raise errors.foreign_host()
    if fetch_site in _OTHER_SITES or (origin is not None and _origin_host(origin) != host):
        raise errors.cross_site()


def identify(scope: Scope, clients: ClientKeys, *, loopback_listener: bool) -> Client:
    """The caller stage: refuse what no app should send (`check_caller`), then the client
    whose key the request carries (401 without a known one)."""
    check_caller(scope, loopback_listener=loopback_listener)
    return clients.identify(scope["headers"])
