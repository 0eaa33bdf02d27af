"""The apps allowed to call the proxy: one key per app, found by the key's sha256.

Each app sends its key the way an InvoisX client sends a token (`Authorization: Bearer`), or
as `X-Proxy-Key`; the proxy keeps only the hashes, from the config file's `[clients.NAME]`.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from proxy import errors
from proxy.config.keys import key_sha256
from proxy.stages.policy import Permission, parse_permissions

__all__ = ["ANONYMOUS", "CLIENT_NAME", "UNIDENTIFIED", "Client", "ClientKeys", "ClientSpec"]

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
    reserved_per_minute: Annotated[int, Field(ge=1)] | None = None

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

    @model_validator(mode="after")
    def _reserve_within_cap(self) -> ClientSpec:
        reserved, cap = self.reserved_per_minute, self.requests_per_minute
        if reserved is not None and cap is not None and reserved > cap:
            raise ValueError(
                f"reserved_per_minute ({reserved}) is more than requests_per_minute ({cap})"
            )
        return self


@dataclass(frozen=True, slots=True)
class Client:
    """The caller as the policy sees it; `permissions` None means whatever the token has."""

    name: str
    permissions: frozenset[Permission] | None
    requests_per_minute: int | None = None


ANONYMOUS = Client("anonymous", None)


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
        # What the rate limit keeps back for each app that has a reservation.
        self.reservations: Mapping[str, int] = MappingProxyType(
            {
                name: spec.reserved_per_minute
                for name, spec in specs.items()
                if spec.reserved_per_minute is not None
            }
        )

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
            raise errors.unauthorized(
                "A client key is required: send it as 'Authorization: Bearer <key>'."
            )
        digest = key_sha256(key.decode("latin-1")).encode()
        found = None
        # Compare with every client, whatever matches, so timing reveals nothing.
        for expected, client in self._clients:
            if hmac.compare_digest(digest, expected):
                found = client
        if found is None:
            raise errors.unauthorized("The client key is not known to this proxy.")
        return found
