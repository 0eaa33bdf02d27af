"""Which permission a request needs, and whether the configured token may make it.

InvoisX tokens carry any of four permissions. The proxy refuses locally what the token
could not do, so a refused call never reaches InvoisX.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, field_validator
from starlette.types import Scope

from proxy.errors import ProxyError
from proxy.stages.target import DOCUMENT_ACTIONS, DOCUMENT_TYPES

__all__ = [
    "DEFAULT_RULES",
    "METHOD_PERMISSIONS",
    "JsonKeyScan",
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


# Laravel runs a POST as the method named by `_method` in the query, a form body or a JSON
# body (Symfony's `Request::getMethod()`; Laravel fills the request bag from JSON). The checks
# below read each as PHP and Laravel do; the override headers never go upstream (forward).
_FORM_BODIES = (b"application/x-www-form-urlencoded", b"multipart/form-data")
# PHP cuts a content type at the first of these (`sapi_read_post_data()`).
_MEDIA_TYPE_END = re.compile(rb"[;, ]")
_OVERRIDE = "_method"


def _php_variable(key: str) -> str:
    """The variable a query key sets in PHP (`php_register_variable_ex()`): cut at NUL,
    leading spaces stripped, ' ' and '.' as '_', and an unclosed '[' as '_'."""
    name = key.partition("\0")[0].lstrip(" ")
    base, bracket, rest = name.partition("[")
    if bracket and "]" not in rest:
        base, bracket = f"{base}_{rest}", ""
    return base.replace(" ", "_").replace(".", "_")


def _override_refused(where: str) -> ProxyError:
    return ProxyError(
        400,
        "BAD_REQUEST",
        f"A _method {where} is not allowed: InvoisX would run another method than this one.",
    )


def check_no_method_override(scope: Scope) -> JsonKeyScan | None:
    """Refuse what could make InvoisX run another method than the one the policy checked.

    Returns a scan for the body when InvoisX would read a `_method` from it (a JSON POST).
    """
    query: bytes = scope["query_string"]
    if query:
        keys = (key for key, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True))
        if any(_php_variable(key) == _OVERRIDE for key in keys):
            raise _override_refused("query parameter")
    types = [value for name, value in scope["headers"] if name == b"content-type"]
    if len(types) > 1:
        raise ProxyError(400, "BAD_REQUEST", "A request may carry one Content-Type header.")
    media_type = _MEDIA_TYPE_END.split(types[0].strip().lower(), 1)[0] if types else b""
    if media_type in _FORM_BODIES:
        raise ProxyError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            "Form bodies are not forwarded: the InvoisX API takes JSON. Send the body with "
            "Content-Type: application/json (with curl: -H 'Content-Type: application/json', "
            "or --json instead of -d).",
        )
    # Laravel reads JSON from any type containing "/json" or "+json"; the proxy sends
    # application/json for a body without a type.
    if scope["method"] == "POST" and (not types or b"json" in types[0].lower()):
        return JsonKeyScan()
    return None


# A key longer than this cannot decode to `_method` (7 characters, at most 6 bytes each).
_MAX_KEY_BYTES = 64
_STRUCTURE = re.compile(rb'["{}\[\],]')
_IN_STRING = re.compile(rb'["\\]')
_WHITESPACE = re.compile(rb"[ \t\r\n]*")


class JsonKeyScan:
    """Reads a JSON body chunk by chunk, as it is forwarded, and refuses it (400) when its
    top-level object has a `_method` key. Holds at most one key's bytes between chunks.

    Valid JSON is read exactly (strings, escapes, nesting); anything else is passed over,
    since PHP's `json_decode` gives null for it and Laravel then reads no `_method` at all.
    """

    __slots__ = ("_depth", "_done", "_escaped", "_expect_key", "_in_string", "_key")

    def __init__(self) -> None:
        self._depth = 0  # 1 inside the top-level object
        self._done = False
        self._in_string = False
        self._escaped = False  # a backslash ended the last chunk
        self._expect_key = False
        self._key: bytearray | None = None  # the top-level key being read, while short

    def feed(self, data: bytes) -> None:
        """Scan the next chunk of the body; raises `ProxyError` on a `_method` key."""
        position, end = 0, len(data)
        while position < end and not self._done:
            if self._in_string:
                position = self._string(data, position)
            elif self._depth == 0:
                position = _WHITESPACE.match(data, position).end()  # type: ignore[union-attr]
                if position < end:
                    # Not an object: Laravel gets a list or a scalar, never a `_method` key.
                    self._done = data[position] != ord("{")
                    self._depth, self._expect_key = 1, True
                    position += 1
            else:
                position = self._structure(data, position)

    def _string(self, data: bytes, position: int) -> int:
        if self._escaped:
            self._escaped = False
            self._keep(data[position : position + 1])
            position += 1
        found = _IN_STRING.search(data, position)
        stop = len(data) if found is None else found.start()
        self._keep(data[position:stop])
        if found is None:
            return stop
        if data[stop] == ord("\\"):
            self._keep(b"\\")
            self._escaped = True
            return stop + 1
        self._in_string = False
        if self._key is not None:
            key, self._key = bytes(self._key), None
            self._check(key)
        return stop + 1

    def _structure(self, data: bytes, position: int) -> int:
        found = _STRUCTURE.search(data, position)
        if found is None:
            return len(data)
        char = data[found.start()]
        if char == ord('"'):
            self._in_string = True
            if self._depth == 1 and self._expect_key:
                self._expect_key = False
                self._key = bytearray()
        elif char in b"{[":
            self._depth += 1
        elif char in b"}]":
            self._depth -= 1
            self._done = self._depth == 0
        elif self._depth == 1:  # a comma between members
            self._expect_key = True
        return found.end()

    def _keep(self, part: bytes) -> None:
        key = self._key
        if key is None:
            return
        if len(key) + len(part) > _MAX_KEY_BYTES:
            self._key = None  # too long to be `_method`
        else:
            key += part

    @staticmethod
    def _check(raw: bytes) -> None:
        try:
            key = json.loads(b'"%b"' % raw)
        except ValueError:
            return  # not valid JSON: PHP reads the whole body as null
        if key == _OVERRIDE:
            raise _override_refused("key in the JSON body")


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
