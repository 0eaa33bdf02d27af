"""Which permission a request needs, and whether the configured token may make it.

InvoisX tokens carry any of four permissions. The proxy refuses locally what the token
could not do, so a refused call never reaches InvoisX.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, field_validator
from starlette.types import Scope

from proxy.errors import ProxyError

__all__ = [
    "DEFAULT_RULES",
    "METHOD_PERMISSIONS",
    "Permission",
    "Policy",
    "RuleSpec",
    "check_no_method_override",
    "parse_permissions",
]


class Permission(StrEnum):
    CREATE = "create"
    READ = "read"
    UPDATE = "update"
    DELETE = "delete"


METHOD_PERMISSIONS: dict[str, Permission] = {
    "GET": Permission.READ,
    "HEAD": Permission.READ,
    "POST": Permission.CREATE,
    "PUT": Permission.UPDATE,
    "PATCH": Permission.UPDATE,
    "DELETE": Permission.DELETE,
}


def parse_permissions(values: Iterable[str]) -> frozenset[Permission]:
    """Turn names like `read` or ` Create ` into permissions; unknown names raise ValueError."""
    permissions = set()
    for value in values:
        name = value.strip().lower()
        if not name:
            continue
        try:
            permissions.add(Permission(name))
        except ValueError:
            raise ValueError(f"unknown permission {value.strip()!r}") from None
    return frozenset(permissions)


class RuleSpec(BaseModel):
    """One route rule from the config file: METHOD + path pattern -> permission."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    path: str
    permission: Permission

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        method = value.upper()
        if method not in METHOD_PERMISSIONS:
            raise ValueError(f"unknown method {value!r}")
        return method

    @field_validator("path")
    @classmethod
    def _relative_pattern(cls, value: str) -> str:
        # Patterns are written relative to the API base, so `/api/v1/...` would never match.
        if not value.startswith("/") or value.startswith("/api/v1/"):
            raise ValueError(f"path {value!r} must start with '/' and be relative to /api/v1")
        return value


# POST actions on an existing document modify it, so they need update rather than create.
DEFAULT_RULES: tuple[RuleSpec, ...] = tuple(
    RuleSpec(method="POST", path=f"/invoices/*/{action}", permission=Permission.UPDATE)
    for action in ("validate", "submit", "cancel")
)


@dataclass(frozen=True, slots=True)
class _Rule:
    method: str
    segments: tuple[str, ...]
    permission: Permission

    def matches(self, method: str, segments: tuple[str, ...]) -> bool:
        # HEAD runs the GET route upstream, so a GET rule must hold for it too.
        same_method = method == self.method or (method == "HEAD" and self.method == "GET")
        if not same_method or len(segments) != len(self.segments):
            return False
        return all(want in ("*", got) for want, got in zip(self.segments, segments, strict=True))


# Laravel lets a POST run as another method through `_method` in the query or a form body
# (PHP turns ' ', '.' and '[' in names into '_'); the override headers are dropped in forward.
_OVERRIDE_KEY = re.compile(r"[ .\[]")
_FORM_BODIES = (b"application/x-www-form-urlencoded", b"multipart/form-data")


def check_no_method_override(scope: Scope) -> None:
    """Refuse what could make InvoisX run another method than the one the policy checked."""
    query: bytes = scope["query_string"]
    if b"method" in query.lower() or b"%" in query:
        keys = (key for key, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True))
        if any(_OVERRIDE_KEY.sub("_", key).startswith("_method") for key in keys):
            raise ProxyError(400, "BAD_REQUEST", "The _method query parameter is not allowed.")
    for name, value in scope["headers"]:
        if name == b"content-type" and value.split(b";")[0].strip().lower() in _FORM_BODIES:
            raise ProxyError(
                415,
                "UNSUPPORTED_MEDIA_TYPE",
                "Form bodies are not forwarded: the InvoisX API takes JSON.",
            )


# A refusal names the side that lacks the permission, and where to grant it.
_LACKS = {
    "token": "the InvoisX token lacks (grant it in the InvoisX dashboard, then add it to "
    "INVOISX_TOKEN_PERMISSIONS)",
    "client": "this client's key lacks (its permissions in INVOISX_PROXY_CONFIG)",
}


class Policy:
    """The token's permissions plus the route rules, compiled once at start-up."""

    def __init__(self, *, granted: frozenset[Permission], rules: Iterable[RuleSpec] = ()) -> None:
        self.granted = granted
        # Operator rules come first so they override the shipped defaults.
        self._rules = tuple(
            _Rule(spec.method, tuple(spec.path.strip("/").split("/")), spec.permission)
            for spec in (*rules, *DEFAULT_RULES)
        )

    @property
    def route_names(self) -> frozenset[str]:
        """The path names the rules spell out; route templates keep them (`route_template`)."""
        return frozenset(part for rule in self._rules for part in rule.segments if part != "*")

    def required_permission(self, method: str, segments: tuple[str, ...]) -> Permission:
        """The permission that `method` on the decoded upstream path `segments` needs."""
        for rule in self._rules:
            if rule.matches(method, segments):
                return rule.permission
        return METHOD_PERMISSIONS[method]

    def check(
        self,
        required: Permission,
        expires_at: datetime | None,
        now: datetime,
        client_permissions: frozenset[Permission] | None = None,
    ) -> None:
        """Raise the InvoisX-shaped refusal when the token is expired, or when the token or
        the calling client (its `client_permissions`; None: no limit) lacks `required`."""
        if expires_at is not None and now >= expires_at:
            raise ProxyError(
                401,
                "TOKEN_EXPIRED",
                f"The InvoisX API token expired at {expires_at.isoformat()} "
                "(INVOISX_TOKEN_EXPIRES_AT). Create a new token and update the proxy.",
                decision="expired",
            )
        lacks = {
            "token": required not in self.granted,
            "client": client_permissions is not None and required not in client_permissions,
        }
        missing = [side for side, lacking in lacks.items() if lacking]
        if missing:
            raise ProxyError(
                403,
                "FORBIDDEN",
                f"This request needs the '{required}' permission, which "
                + " and ".join(_LACKS[side] for side in missing)
                + ".",
                decision="denied",
                extra={"required_permission": str(required), "missing_from": missing},
            )
