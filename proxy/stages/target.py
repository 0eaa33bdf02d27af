"""Which upstream path a request target maps to, refusing anything that could escape it.

Decisions are made on the raw request target (`scope["raw_path"]`), never on a decoded path
or a URL rebuilt from the Host header, so encodings cannot smuggle a different path past us.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from proxy import errors
from proxy.errors import ProxyError

__all__ = [
    "API_PREFIX",
    "DOCUMENT_ACTIONS",
    "DOCUMENT_TYPES",
    "KNOWN_NAMES",
    "Target",
    "parse_target",
    "route_template",
]

API_PREFIX = b"/api/v1/"
# The API's root itself, which InvoisX serves nothing at.
_API_ROOTS = frozenset({API_PREFIX, API_PREFIX.rstrip(b"/")})

# Letters, digits, '-', '_' and '~' need no decoding and can form no dot segment.
_PLAIN_SEGMENT = re.compile(rb"[A-Za-z0-9_~-]+")
# The e-invoice document types, and the POST actions on one (`/invoices/{id}/submit`).
DOCUMENT_TYPES = (
    "invoices",
    "credit-notes",
    "debit-notes",
    "refund-notes",
    "self-billed-invoices",
    "self-billed-credit-notes",
    "self-billed-debit-notes",
    "self-billed-refund-notes",
)
DOCUMENT_ACTIONS = ("validate", "submit", "cancel")
# Path segments that name a resource or an action (documented, or implied by InvoisX's guides);
# everything else in a route template becomes a placeholder, so templates stay a bounded set.
KNOWN_NAMES = frozenset({"buyers", *DOCUMENT_TYPES, *DOCUMENT_ACTIONS, "status"})
# Deeper paths are cut here: a client cannot mint new templates by adding segments.
_TEMPLATE_DEPTH = 4
# Percent-decoding twice catches double encodings such as %252e%252e (a '..' after two
# decodes) that a careless upstream or intermediary might decode again.
_DECODE_ROUNDS = 2


@dataclass(frozen=True, slots=True)
class Target:
    """A request target that is safe to forward."""

    raw: str  # below the upstream base, still percent-encoded exactly as the client sent it
    segments: tuple[str, ...]  # decoded once, as the upstream will route it


def _bad_path(reason: str) -> ProxyError:
    return errors.path_not_allowed(reason)


def _not_served(raw_path: bytes) -> ProxyError:
    if raw_path in _API_ROOTS:
        reason = "The path names no resource: add one after /api/v1/"
    else:
        reason = "Only paths below /api/v1/ are served by this proxy"
    return errors.not_served(reason)


def _decode_segment(segment: bytes) -> str:
    if _PLAIN_SEGMENT.fullmatch(segment):
        return segment.decode()  # the common case: nothing to decode, nothing to check
    if any(byte <= 0x20 or byte >= 0x7F for byte in segment):
        raise _bad_path("it contains a character that must be percent-encoded")
    decoded = segment
    for _ in range(_DECODE_ROUNDS):
        decoded = unquote_to_bytes(decoded)
        if b"/" in decoded:
            raise _bad_path("it contains an encoded slash")
        if b"\\" in decoded:
            raise _bad_path("it contains a backslash")
        if decoded == b"." or b".." in decoded:
            raise _bad_path("it contains a dot segment")
        if any(byte < 0x20 or byte == 0x7F for byte in decoded):
            raise _bad_path("it contains a control character")
    return unquote_to_bytes(segment).decode("utf-8", "replace")


def parse_target(raw_path: bytes) -> Target:
    """The safe upstream target for `raw_path`.

    Raises 404 `NOT_FOUND` outside `/api/v1/` and 400 `BAD_REQUEST` for unsafe segments.
    """
    if not raw_path.startswith(API_PREFIX) or raw_path == API_PREFIX:
        raise _not_served(raw_path)
    rest = raw_path[len(API_PREFIX) :]
    parts = rest.split(b"/")
    # A single trailing slash is harmless; any other empty segment is a '//'.
    if parts[-1] == b"":
        parts.pop()
    if not all(parts):
        raise _bad_path("it contains an empty segment")
    segments = tuple(_decode_segment(part) for part in parts)
    return Target(raw="/" + rest.decode("ascii"), segments=segments)


def route_template(segments: tuple[str, ...], names: frozenset[str] = KNOWN_NAMES) -> str:
    """The path with ids as placeholders (`/buyers/{id}`): a bounded label for metrics and audit.

    Even positions name resources and actions and are kept when in `names`; odd positions are ids.
    """
    parts = [
        ("{id}" if index % 2 else segment if segment in names else "{name}")
        for index, segment in enumerate(segments[:_TEMPLATE_DEPTH])
    ]
    if len(segments) > _TEMPLATE_DEPTH:
        parts.append("*")
    return "/" + "/".join(parts)
