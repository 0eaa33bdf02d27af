"""The request as InvoisX gets it: the target below the base path, the headers the policy
lets through (`headers`), the injected token, and the body framed as it will be sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import Scope

from proxy.stages.limits import Body
from proxy.upstream.headers import request_headers
from proxy.upstream.http11 import Origin, request_head

__all__ = ["Inspect", "Request", "Upload", "frame"]

# Sees each chunk of a request body before it is forwarded; raises `ProxyError` to refuse it.
Inspect = Callable[[bytes], None]
# Methods whose requests carry no body, so no `Content-Length: 0` either.
_NO_BODY_METHODS = frozenset({"GET", "HEAD"})
_RETRYABLE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Upload:
    """A request body streamed from the client as it arrives, chunked when it came chunked,
    each chunk shown to `inspect` before it goes on."""

    body: Body
    inspect: Inspect | None


@dataclass(frozen=True, slots=True)
class Request:
    """What each attempt at one call sends, framed once.

    Only a GET or HEAD without a body is retried (nothing else can be assumed harmless twice),
    and only when InvoisX answered 429 or 503, no connection could be opened, or a kept-alive
    connection closed before any byte of the answer.
    """

    method: str
    # Never in a repr: the head and the authorization carry the token, the body is the client's.
    head: bytes = field(repr=False)  # request line and headers
    body: bytes | Upload | None = field(repr=False)
    authorization: bytes = field(repr=False)

    @property
    def retryable(self) -> bool:
        return self.method in _RETRYABLE_METHODS and self.body is None


def frame(
    origin: Origin,
    scope: Scope,
    path: str,
    authorization: bytes,
    request_id: str,
    body: bytes | Body | None,
    inspect: Inspect | None = None,
) -> Request:
    """The call to `path` below the base URL, framed once for every attempt: the body read
    whole (`bytes`), streamed as it arrives (`Body`, each chunk shown to `inspect`), or none."""
    method: str = scope["method"]
    target = origin.base_path + path.encode()
    if query := scope["query_string"]:
        target += b"?" + query
    content: bytes | Upload | None
    framing: list[tuple[bytes, bytes]]
    if isinstance(body, bytes):
        content = body or None
        framing = [(b"content-length", b"%d" % len(body))]
    elif body is None:
        content = None
        framing = [] if method in _NO_BODY_METHODS else [(b"content-length", b"0")]
    else:
        content = Upload(body, inspect)
        declared = body.declared
        framing = [
            (b"transfer-encoding", b"chunked")
            if declared is None
            else (b"content-length", b"%d" % declared)
        ]
    outgoing = request_headers(scope["headers"], authorization, content is not None, request_id)
    head = request_head(method.encode(), target, origin.host_header, outgoing + framing)
    return Request(method, head, content, authorization)
