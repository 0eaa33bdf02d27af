"""Who is calling: the client key's owner, the peer address, and refused browser requests.

With client keys configured, each app proves who it is with its own key, sent the way an
InvoisX client sends a token. A proxy that holds a credential must also not be usable by web
pages the local user happens to open: not by DNS rebinding (a foreign Host name), not by a
cross-site form or fetch.
"""

from __future__ import annotations

import functools
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from starlette.types import Scope

from proxy.config.keys import key_sha256
from proxy.config.settings import is_loopback
from proxy.errors import ProxyError
from proxy.stages.policy import Permission, parse_permissions

__all__ = [
    "ANONYMOUS",
    "UNIDENTIFIED",
    "Client",
    "ClientKeys",
    "ClientSpec",
    "check_caller",
    "peer_address",
]

# Names appear in audit lines and metric labels, and are TOML keys: keep them plain.
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# What the audit line and metrics call a caller whose key was missing or unknown.
UNIDENTIFIED = "unknown"
_BEARER = b"bearer "


class ClientSpec(BaseModel):
    """One `[clients.NAME]` table of the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]
    permissions: frozenset[Permission]
    requests_per_minute: Annotated[int, Field(ge=1)] | None = None

    @field_validator("key_sha256")
    @classmethod
    def _lowercase(cls, value: str) -> str:
        return value.lower()

    @field_validator("permissions", mode="before")
    @classmethod
    def _known_permissions(cls, value: Any) -> Any:
        # A string would be read letter by letter.
        if not isinstance(value, list | tuple | set | frozenset):
            raise ValueError('must be a list of names, such as ["read", "create"]')
        permissions = parse_permissions(value)
        if not permissions:
            raise ValueError("name at least one of create, read, update, delete")
        return permissions


@dataclass(frozen=True, slots=True)
class Client:
    """The caller as the policy sees it; `permissions` None means whatever the token has."""

    name: str
    permissions: frozenset[Permission] | None
    requests_per_minute: int | None = None


ANONYMOUS = Client("anonymous", None)


def _unauthorized(message: str) -> ProxyError:
    return ProxyError(401, "UNAUTHORIZED", message, decision="denied")


def _presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """X-Proxy-Key if sent, else the Bearer value of Authorization."""
    bearer = None
    for name, value in headers:
        if name == b"x-proxy-key":
            return value.strip()
        if name == b"authorization" and value[:7].lower() == _BEARER:
            bearer = value[7:].strip()
    return bearer


class ClientKeys:
    """The configured clients, found by the sha256 of the key a request presents."""

    def __init__(self, specs: Mapping[str, ClientSpec]) -> None:
        self._clients = [
            (spec.key_sha256.encode(), Client(name, spec.permissions, spec.requests_per_minute))
            for name, spec in specs.items()
        ]

    def __len__(self) -> int:
        return len(self._clients)

    @property
    def before_identified(self) -> str:
        """The client name to log for a call refused before its key was checked."""
        return UNIDENTIFIED if self._clients else ANONYMOUS.name

    def identify(self, headers: list[tuple[bytes, bytes]]) -> Client:
        """The client whose key the request carries; 401 `UNAUTHORIZED` without a known key.

        With no clients configured every caller is `ANONYMOUS`.
        """
        if not self._clients:
            return ANONYMOUS
        key = _presented_key(headers)
        if not key:
            raise _unauthorized(
                "A client key is required: send it as 'Authorization: Bearer <key>'."
            )
        digest = key_sha256(key.decode("latin-1")).encode()
        found = None
        # Compare with every client, whatever matches, so timing reveals nothing.
        for expected, client in self._clients:
            if hmac.compare_digest(digest, expected):
                found = client
        if found is None:
            raise _unauthorized("The client key is not known to this proxy.")
        return found


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
