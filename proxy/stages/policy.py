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

from pydantic import BaseModel, ConfigDict, field_validator
from starlette.types import Scope

from proxy import errors
from proxy.stages.override import JsonKeyScan, check_no_method_override
from proxy.stages.target import DOCUMENT_ACTIONS, DOCUMENT_TYPES

__all__ = [
    "DEFAULT_RULES",
    "METHOD_PERMISSIONS",
    "Grant",
    "Permission",
    "Policy",
    "RuleSpec",
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


# An unknown name is echoed only when it could be a misspelt one ('craete'): anything longer,
# or with digits or symbols, may be a token pasted into the wrong place, and error lines are
# printed and logged.
_ECHOED_NAME = re.compile(r"[A-Za-z]{1,12}")


def _shown(name: str) -> str:
    return repr(name) if _ECHOED_NAME.fullmatch(name) else "(not shown: it may be a secret)"


def parse_permissions(values: Iterable[object]) -> frozenset[Permission]:
    """Turn names like `read` or ` Create ` into permissions; unknown names raise ValueError."""
    permissions = set()
    for value in values:
        if not isinstance(value, str):
            raise ValueError("permissions are names: create, read, update or delete")
        name = value.strip().lower()
        if not name:
            continue
        try:
            permissions.add(Permission(name))
        except ValueError:
            raise ValueError(
                f"unknown permission {_shown(value.strip())}; use create, read, update or delete"
            ) from None
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
    RuleSpec(method="POST", path=f"/{kind}/*/{action}", permission=Permission.UPDATE)
    for kind in DOCUMENT_TYPES
    for action in DOCUMENT_ACTIONS
)


@dataclass(frozen=True, slots=True)
class _Rule:
    method: str
    segments: tuple[str, ...]
    permission: Permission

    def applies_to(self, method: str) -> bool:
        # HEAD runs the GET route upstream, so a GET rule must hold for it too.
        return method == self.method or (method == "HEAD" and self.method == "GET")

    def matches(self, method: str, segments: tuple[str, ...]) -> bool:
        if not self.applies_to(method) or len(segments) != len(self.segments):
            return False
        return all(want in ("*", got) for want, got in zip(self.segments, segments, strict=True))


# What a 405 names in its Allow header.
_ALLOWED = ", ".join(METHOD_PERMISSIONS)


@dataclass(frozen=True, slots=True)
class Grant:
    """What the policy let through: the permission the call needs, and the scan its body
    must pass when InvoisX would read a `_method` from it."""

    required: Permission
    scan: JsonKeyScan | None


class Policy:
    """The token's permissions plus the route rules, compiled once at start-up."""

    def __init__(self, *, granted: frozenset[Permission], rules: Iterable[RuleSpec] = ()) -> None:
        self.granted = granted
        # Operator rules come first so they override the shipped defaults.
        self._rules = tuple(
            _Rule(spec.method, tuple(spec.path.strip("/").split("/")), spec.permission)
            for spec in (*rules, *DEFAULT_RULES)
        )
        # The rules that can match a method and a path length, in order: most calls (a list
        # or one buyer) have none to try, whatever the number of document types.
        self._by_shape: dict[tuple[str, int], tuple[_Rule, ...]] = {}
        for method in METHOD_PERMISSIONS:
            for rule in self._rules:
                if rule.applies_to(method):
                    shape = (method, len(rule.segments))
                    self._by_shape[shape] = (*self._by_shape.get(shape, ()), rule)

    @property
    def route_names(self) -> frozenset[str]:
        """The path names the rules spell out; route templates keep them (`route_template`)."""
        return frozenset(part for rule in self._rules for part in rule.segments if part != "*")

    def required_permission(self, method: str, segments: tuple[str, ...]) -> Permission:
        """The permission that `method` on the decoded upstream path `segments` needs."""
        for rule in self._by_shape.get((method, len(segments)), ()):
            if rule.matches(method, segments):
                return rule.permission
        return METHOD_PERMISSIONS[method]

    def authorize(
        self,
        scope: Scope,
        segments: tuple[str, ...],
        client_permissions: frozenset[Permission] | None,
        expires_at: datetime | None,
        now: datetime,
    ) -> Grant:
        """The policy stage: the method is one InvoisX uses and is not overridden, the token
        is not expired, and both the token and the client (`client_permissions`; None: no
        limit) hold the permission the route needs. Raises the InvoisX-shaped refusal."""
        method: str = scope["method"]
        if method not in METHOD_PERMISSIONS:
            raise errors.method_not_allowed(method, _ALLOWED)
        scan = check_no_method_override(scope)
        required = self.required_permission(method, segments)
        if expires_at is not None and now >= expires_at:
            raise errors.token_expired(expires_at, str(required))
        lacks = {
            "token": required not in self.granted,
            "client": client_permissions is not None and required not in client_permissions,
        }
        missing = [side for side, lacking in lacks.items() if lacking]
        if missing:
            raise errors.forbidden(str(required), missing)
        return Grant(required, scan)
