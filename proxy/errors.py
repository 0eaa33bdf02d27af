"""Every answer the proxy makes itself: its codes, one constructor per refusal, the envelope.

Every proxy-made error reads like one from InvoisX, so existing client code handles it:
`{"success": false, "message": "...", "error_code": "..."}` plus an `X-Request-ID` header.
The README's table "Errors the proxy answers itself" lists them, checked against
`ErrorCode` by the tests.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from starlette.types import Send

__all__ = [
    "BODY_INCOMPLETE",
    "INTERNAL_ERROR",
    "SHUTTING_DOWN",
    "Decision",
    "ErrorCode",
    "ProxyError",
    "envelope",
    "send_error",
]

# `error` marks a failure inside the proxy itself (a bug), never a client or InvoisX problem;
# `aborted` a call cut off because the proxy was shutting down; `replayed` an answer given
# again for a repeated Idempotency-Key, without calling InvoisX; `unavailable` a call not sent
# because the store that guards it (Redis) did not answer.
Decision = Literal[
    "forwarded",
    "replayed",
    "denied",
    "expired",
    "invalid",
    "rate_limited",
    "upstream_error",
    "aborted",
    "unavailable",
    "error",
]


class ErrorCode(StrEnum):
    """The `error_code` of every answer the proxy makes, and of what audit lines record."""

    BAD_REQUEST = "BAD_REQUEST"
    CLIENT_BODY_INCOMPLETE = "CLIENT_BODY_INCOMPLETE"
    UNAUTHORIZED = "UNAUTHORIZED"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    CLIENT_TIMEOUT = "CLIENT_TIMEOUT"
    IDEMPOTENCY_RESPONSE_NOT_KEPT = "IDEMPOTENCY_RESPONSE_NOT_KEPT"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    URI_TOO_LONG = "URI_TOO_LONG"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
    HEADERS_TOO_LARGE = "HEADERS_TOO_LARGE"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"
    PROXY_BUSY = "PROXY_BUSY"
    IDEMPOTENCY_STORE_FULL = "IDEMPOTENCY_STORE_FULL"
    IDEMPOTENCY_OUTCOME_UNKNOWN = "IDEMPOTENCY_OUTCOME_UNKNOWN"
    IDEMPOTENCY_STORE_UNAVAILABLE = "IDEMPOTENCY_STORE_UNAVAILABLE"
    PROXY_SHUTTING_DOWN = "PROXY_SHUTTING_DOWN"
    UPSTREAM_TIMEOUT = "UPSTREAM_TIMEOUT"
    # Only in audit lines: the client left, so nobody got an answer (status 499).
    CLIENT_DISCONNECTED = "CLIENT_DISCONNECTED"


class ProxyError(Exception):
    """A refusal or failure that the proxy answers locally, without (more) upstream traffic.

    `permission` is what the refused call needed, when the refusal is about it.
    """

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        decision: Decision = "invalid",
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        permission: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = code
        self.message = message
        self.decision: Decision = decision
        self.extra = extra or {}
        self.headers = headers or {}
        self.permission = permission


def _bad_request(message: str) -> ProxyError:
    return ProxyError(400, ErrorCode.BAD_REQUEST, message)


INTERNAL_ERROR = ProxyError(
    500, ErrorCode.INTERNAL_ERROR, "The proxy failed to handle this request.", decision="error"
)

# No Retry-After: InvoisX may already have acted on the call, so a blind retry could repeat it.
SHUTTING_DOWN = ProxyError(
    503,
    ErrorCode.PROXY_SHUTTING_DOWN,
    "The proxy shut down before InvoisX answered; the call may or may not have taken effect.",
    decision="aborted",
)

# The client's connection closed before the last byte of its request body: it is gone, so
# this is for its audit line and metrics, which must not blame InvoisX.
BODY_INCOMPLETE = ProxyError(
    400,
    ErrorCode.CLIENT_BODY_INCOMPLETE,
    "The connection closed before the request body was complete, so InvoisX never got the "
    "whole request.",
)


# --- the wire (server.listener) -------------------------------------------------------------


def not_http() -> ProxyError:
    """400: the HTTP parser could not read the request."""
    return _bad_request("The request is not valid HTTP/1.1.")


def target_too_long(limit: int) -> ProxyError:
    """414: the request target is over `limit` bytes."""
    return ProxyError(
        414, ErrorCode.URI_TOO_LONG, f"The request target is longer than {limit} bytes."
    )


def framing_too_large(limit: int) -> ProxyError:
    """431: chunk framing or trailers ran on without body bytes."""
    return ProxyError(
        431,
        ErrorCode.HEADERS_TOO_LARGE,
        f"The request's chunk framing or trailers ran over {limit} bytes.",
    )


def head_too_slow(seconds: float) -> ProxyError:
    """408: the request head did not arrive within the client timeout."""
    return ProxyError(
        408,
        ErrorCode.CLIENT_TIMEOUT,
        f"The request head did not arrive within {seconds:g} seconds "
        "(INVOISX_PROXY_CLIENT_TIMEOUT).",
    )


def headers_too_large(limit: int) -> ProxyError:
    """431: the request headers are over INVOISX_PROXY_MAX_HEADER_BYTES (`limit`)."""
    return ProxyError(
        431,
        ErrorCode.HEADERS_TOO_LARGE,
        f"The request headers are larger than {limit} bytes (INVOISX_PROXY_MAX_HEADER_BYTES).",
    )


# --- target ---------------------------------------------------------------------------------


def path_not_allowed(reason: str) -> ProxyError:
    """400: a path segment that could escape or confuse the upstream path."""
    return _bad_request(f"The request path is not allowed: {reason}.")


def not_served(reason: str) -> ProxyError:
    """404: outside `/api/v1/`, or the API root itself."""
    return ProxyError(404, ErrorCode.NOT_FOUND, f"{reason}, for example /api/v1/buyers.")


# --- caller and client ----------------------------------------------------------------------


def foreign_host() -> ProxyError:
    """400: a Host name that is not this machine, on a loopback listener (DNS rebinding)."""
    return _bad_request("The Host header must name this machine (localhost or a loopback address).")


def cross_site() -> ProxyError:
    """403: a request from a web page on another site."""
    return ProxyError(
        403,
        ErrorCode.FORBIDDEN,
        "Requests from web pages on other sites are refused; call the proxy from servers.",
        decision="denied",
    )


def unauthorized(message: str) -> ProxyError:
    """401: no client key, or an unknown one."""
    return ProxyError(401, ErrorCode.UNAUTHORIZED, message, decision="denied")


# --- policy ---------------------------------------------------------------------------------


def method_not_allowed(method: str, allowed: str) -> ProxyError:
    """405: a method the InvoisX API does not use; `allowed` for the Allow header."""
    return ProxyError(
        405,
        ErrorCode.METHOD_NOT_ALLOWED,
        f"The {method[:16]} method is not supported by the InvoisX API.",
        headers={"allow": allowed},
    )


def override_refused(where: str) -> ProxyError:
    """400: a `_method` that would make InvoisX run another method than the one checked."""
    return _bad_request(
        f"A _method {where} is not allowed: InvoisX would run another method than this one."
    )


def two_content_types() -> ProxyError:
    """400: more than one Content-Type header."""
    return _bad_request("A request may carry one Content-Type header.")


def form_body() -> ProxyError:
    """415: a form body, which InvoisX (and the method-override check) does not take."""
    return ProxyError(
        415,
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        "Form bodies are not forwarded: the InvoisX API takes JSON. Send the body with "
        "Content-Type: application/json (with curl: -H 'Content-Type: application/json', "
        "or --json instead of -d).",
    )


def token_expired(expires_at: datetime, permission: str) -> ProxyError:
    """401: the InvoisX token is past its expiry."""
    return ProxyError(
        401,
        ErrorCode.TOKEN_EXPIRED,
        f"The InvoisX API token expired at {expires_at.isoformat()} "
        "(INVOISX_TOKEN_EXPIRES_AT). Create a new token and update the proxy.",
        decision="expired",
        permission=permission,
    )


# A refusal names the side that lacks the permission, and where to grant it.
_LACKS = {
    "token": "the InvoisX token lacks (grant it in the InvoisX dashboard, then add it to "
    "INVOISX_TOKEN_PERMISSIONS)",
    "client": "this client's key lacks (its permissions in INVOISX_PROXY_CONFIG)",
}


def forbidden(permission: str, missing: list[str]) -> ProxyError:
    """403: `permission` is lacking from the sides in `missing` ("token", "client"); the
    message says where to grant it."""
    lacks = " and ".join(_LACKS[side] for side in missing)
    return ProxyError(
        403,
        ErrorCode.FORBIDDEN,
        f"This request needs the '{permission}' permission, which {lacks}.",
        decision="denied",
        extra={"required_permission": permission, "missing_from": missing},
        permission=permission,
    )


# --- limits ---------------------------------------------------------------------------------


def content_length_invalid() -> ProxyError:
    """400: a Content-Length that is not one whole number."""
    return _bad_request("The Content-Length header is invalid.")


def body_too_large(limit: int) -> ProxyError:
    """413: a body over INVOISX_PROXY_MAX_BODY_BYTES."""
    return ProxyError(
        413,
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"The request body is larger than {limit} bytes (INVOISX_PROXY_MAX_BODY_BYTES).",
    )


def body_length_mismatch(received: int, declared: int) -> ProxyError:
    """400: the body has more or fewer bytes than its Content-Length."""
    return _bad_request(
        f"The request body has {'more' if received > declared else 'fewer'} bytes than its "
        f"Content-Length ({declared})."
    )


def body_stalled(seconds: float, received: int, declared: int | None) -> ProxyError:
    """408: the body stopped arriving for the client timeout."""
    of = "" if declared is None else f" of {declared}"
    return ProxyError(
        408,
        ErrorCode.CLIENT_TIMEOUT,
        f"The request body stopped arriving: nothing for {seconds:g} s "
        f"(INVOISX_PROXY_CLIENT_TIMEOUT) after {received}{of} bytes, so InvoisX never got "
        "the whole request.",
        # The rest of the body may never come: the connection cannot carry another request.
        headers={"connection": "close"},
    )


def target_not_allowed() -> ProxyError:
    """400: a control character or space in the target, which could split the request line."""
    return _bad_request("The request target is not allowed.")


def header_not_utf8() -> ProxyError:
    """400: a header value that InvoisX could read as another than the one checked."""
    return _bad_request("A header value is not valid UTF-8.")


# --- rate limit -----------------------------------------------------------------------------


def rate_limited(why: str, per_minute: int, retry_after: int, reset: int) -> ProxyError:
    """429: no capacity in time (`why`), with InvoisX's headers: try again in `retry_after`
    seconds; the limit is `per_minute`, none remains until `reset` (Unix time)."""
    return ProxyError(
        429,
        ErrorCode.RATE_LIMIT_EXCEEDED,
        f"Too many requests through this proxy ({why}; InvoisX allows "
        f"{per_minute} a minute). Please try again in {retry_after} seconds.",
        decision="rate_limited",
        headers={
            "retry-after": str(retry_after),
            "x-ratelimit-limit": str(per_minute),
            "x-ratelimit-remaining": "0",
            "x-ratelimit-reset": str(reset),
        },
    )


# --- idempotency ----------------------------------------------------------------------------


def idempotency_key_invalid() -> ProxyError:
    """400: an Idempotency-Key that is not 1-255 visible ASCII characters."""
    return _bad_request("Idempotency-Key must be 1-255 visible ASCII characters.")


def idempotency_key_reused() -> ProxyError:
    """422: the key was used for a different request."""
    return ProxyError(
        422,
        ErrorCode.IDEMPOTENCY_KEY_REUSED,
        "This Idempotency-Key was used for a different request.",
    )


def held_body_too_large(limit: int) -> ProxyError:
    """413: a body with an Idempotency-Key over what may be held (would not fit even alone)."""
    return ProxyError(
        413,
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"A request body with an Idempotency-Key may be at most {limit} bytes "
        "(INVOISX_PROXY_MAX_BUFFERED_BYTES).",
    )


def bodies_busy() -> ProxyError:
    """503: the bodies held for Idempotency-Key calls fill the budget; retry shortly."""
    return ProxyError(
        503,
        ErrorCode.PROXY_BUSY,
        "Too many request bodies with an Idempotency-Key are held at once "
        "(INVOISX_PROXY_MAX_BUFFERED_BYTES). Try again shortly.",
        headers={"retry-after": "1"},
    )


def idempotency_store_full() -> ProxyError:
    """503: every remembered key is still in flight."""
    return ProxyError(
        503,
        ErrorCode.IDEMPOTENCY_STORE_FULL,
        "Too many calls with an Idempotency-Key are in flight. Try again shortly.",
    )


def idempotency_store_unavailable() -> ProxyError:
    """503: the shared store of keys (Redis) does not answer; the call was not sent."""
    return ProxyError(
        503,
        ErrorCode.IDEMPOTENCY_STORE_UNAVAILABLE,
        "The store of Idempotency-Keys is unavailable, so the call was not sent (it could not "
        "be guarded against a double submission). Try again shortly.",
        decision="unavailable",
        headers={"retry-after": "2"},
    )


def idempotency_outcome_unknown() -> ProxyError:
    """409: the first call with this key was sent to InvoisX but its answer was lost."""
    return ProxyError(
        409,
        ErrorCode.IDEMPOTENCY_OUTCOME_UNKNOWN,
        "A call with this Idempotency-Key was sent to InvoisX but its answer was lost, so it "
        "may or may not have taken effect. Look the document up in InvoisX before sending it "
        "again, under a new Idempotency-Key.",
        decision="replayed",
    )


def response_not_kept() -> ProxyError:
    """409: a repeat whose first answer was carried out but too large to keep."""
    return ProxyError(
        409,
        ErrorCode.IDEMPOTENCY_RESPONSE_NOT_KEPT,
        "This request was already carried out; its answer was too large to keep.",
        decision="replayed",
    )


# --- upstream -------------------------------------------------------------------------------


def upstream_unavailable(message: str) -> ProxyError:
    """502: InvoisX unreachable, or the exchange broke before an answer; `message` says how."""
    return ProxyError(502, ErrorCode.UPSTREAM_UNAVAILABLE, message, decision="upstream_error")


def upstream_timeout(message: str) -> ProxyError:
    """504: InvoisX did not answer, or stopped taking the upload, in time."""
    return ProxyError(504, ErrorCode.UPSTREAM_TIMEOUT, message, decision="upstream_error")


# --- the envelope ---------------------------------------------------------------------------


def envelope(error_code: str, message: str, extra: dict[str, Any] | None = None) -> bytes:
    """The JSON body InvoisX uses for errors."""
    body = {"success": False, "message": message, "error_code": error_code, **(extra or {})}
    return json.dumps(body, separators=(",", ":")).encode()


async def send_error(send: Send, error: ProxyError, request_id: str) -> int:
    """Send `error` as a complete response; return the number of body bytes sent."""
    body = envelope(error.error_code, error.message, error.extra)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        *((name.lower().encode(), value.encode()) for name, value in error.headers.items()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return len(body)
