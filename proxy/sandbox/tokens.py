"""Sandbox API tokens: the registry and the bearer-token check InvoisX applies to every call."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from proxy.sandbox.errors import SandboxError

__all__ = [
    "PERMISSIONS",
    "SandboxToken",
    "TokenRegistry",
    "authenticate",
    "new_token_value",
]

PERMISSIONS = frozenset({"create", "read", "update", "delete"})


@dataclass
class SandboxToken:
    """One API token as created in the InvoisX dashboard; `revoked` may flip at runtime."""

    value: str
    name: str
    permissions: frozenset[str]
    expires_at: datetime | None = None
    revoked: bool = False

    def __post_init__(self) -> None:
        self.permissions = frozenset(self.permissions)
        unknown = self.permissions - PERMISSIONS
        if unknown:
            raise ValueError(
                f"unknown permissions {sorted(unknown)}; allowed: {sorted(PERMISSIONS)}"
            )
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("expires_at must be timezone-aware")


def new_token_value() -> str:
    """A random token value shaped like a real one."""
    return "ixs_" + secrets.token_urlsafe(32)


class TokenRegistry:
    """The tokens the sandbox accepts, by value; tests add and revoke them at runtime."""

    def __init__(self, tokens: Iterable[SandboxToken] = ()) -> None:
        self._tokens: dict[str, SandboxToken] = {}
        for token in tokens:
            self.add(token)

    def add(self, token: SandboxToken) -> SandboxToken:
        """Register `token` (replacing one with the same value) and return it."""
        self._tokens[token.value] = token
        return token

    def revoke(self, value: str) -> None:
        """Revoke the token with this value; effective on the next request. KeyError if unknown."""
        self._tokens[value].revoked = True

    def get(self, value: str) -> SandboxToken | None:
        """The token with this value, revoked or not, or None."""
        return self._tokens.get(value)

    def __iter__(self) -> Iterator[SandboxToken]:
        return iter(list(self._tokens.values()))

    def __len__(self) -> int:
        return len(self._tokens)


_UNAUTHENTICATED = (401, "UNAUTHORIZED", "Unauthenticated.")


def authenticate(registry: TokenRegistry, authorization: str | None, now: float) -> SandboxToken:
    """The live token named by an `Authorization: Bearer` value at Unix time `now`, or raise 401."""
    token = None
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        # A dict lookup, like Sanctum's query by hashed token: no per-token string comparison.
        if scheme.lower() == "bearer" and value.strip():
            token = registry.get(value.strip())
    if token is None or token.revoked:
        raise SandboxError(*_UNAUTHENTICATED)
    if token.expires_at is not None and token.expires_at.timestamp() <= now:
        raise SandboxError(401, "TOKEN_EXPIRED", "The API token has expired.")
    return token
