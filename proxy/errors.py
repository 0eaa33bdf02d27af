"""Errors the proxy answers itself, in InvoisX's own envelope.

Every proxy-made error reads like one from InvoisX, so existing client code handles it:
`{"success": false, "message": "...", "error_code": "..."}` plus an `X-Request-ID` header.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from starlette.types import Send

__all__ = [
    "BODY_INCOMPLETE",
    "INTERNAL_ERROR",
    "SHUTTING_DOWN",
    "Decision",
    "ProxyError",
    "envelope",
    "headers_too_large",
    "send_error",
]

# `error` marks a failure inside the proxy itself (a bug), never a client or InvoisX problem;
# `aborted` a call cut off because the proxy was shutting down; `replayed` an answer given
# again for a repeated Idempotency-Key, without calling InvoisX.
Decision = Literal[
    "forwarded",
    "replayed",
    "denied",
    "expired",
    "invalid",
    "rate_limited",
    "upstream_error",
    "aborted",
    "error",
]


class ProxyError(Exception):
    """A refusal or failure that the proxy answers locally, without (more) upstream traffic."""

    def __init__(
        self,
        status: int,
        error_code: str,
        message: str,
        *,
        decision: Decision = "invalid",
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.decision: Decision = decision
        self.extra = extra or {}
        self.headers = headers or {}


INTERNAL_ERROR = ProxyError(
    500, "INTERNAL_ERROR", "The proxy failed to handle this request.", decision="error"
)

# No Retry-After: InvoisX may already have acted on the call, so a blind retry could repeat it.
SHUTTING_DOWN = ProxyError(
    503,
    "PROXY_SHUTTING_DOWN",
    "The proxy shut down before InvoisX answered; the call may or may not have taken effect.",
    decision="aborted",
)


# The client's connection closed before the last byte of its request body: it is gone, so
# this is for its audit line and metrics, which must not blame InvoisX.
BODY_INCOMPLETE = ProxyError(
    400,
    "CLIENT_BODY_INCOMPLETE",
    "The connection closed before the request body was complete, so InvoisX never got the "
    "whole request.",
)


def headers_too_large(limit: int) -> ProxyError:
    """431: the request headers are over INVOISX_PROXY_MAX_HEADER_BYTES (`limit`)."""
    return ProxyError(
        431,
        "HEADERS_TOO_LARGE",
        f"The request headers are larger than {limit} bytes (INVOISX_PROXY_MAX_HEADER_BYTES).",
    )


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
