"""One call's record: what happened to it, as its audit line and metrics report it.

The stages fill in who called and what it needed, and count its progress (bytes, waits,
retries) as plain fields; each way a call can end is one method here, so the rules for
recording it (a client that left is not InvoisX's failure, an answer that started cannot be
replaced) live in one place.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from starlette.types import Scope

from proxy.errors import BODY_INCOMPLETE, Decision, ErrorCode, ProxyError

__all__ = ["Exchange", "new_request_id", "request_id"]

# nginx's convention for "client closed the connection before the response was complete".
_CLIENT_CLOSED = 499

# A client-chosen request id is reused for tracing only when it cannot disturb a log line.
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# Ids are for tracing, not secrets: no system call for randomness on every request. A
# generator of its own, seeded once from the OS, so that nothing reseeding the module's
# shared one (a test framework, a library) can make ids repeat.
_IDS = random.Random()


def new_request_id() -> str:
    """A fresh request id: 32 hex digits."""
    return f"{_IDS.getrandbits(128):032x}"


def request_id(scope: Scope) -> str:
    """The client's X-Request-ID when it is safe to log, else a fresh one."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"x-request-id" and _SAFE_REQUEST_ID.fullmatch(value):
            return value.decode()
    return new_request_id()


@dataclass(slots=True)
class Exchange:
    """One request's progress through the proxy: what the audit line reports."""

    request_id: str
    client: str
    route: str | None = None
    required: str | None = None
    status: int = 0
    decision: Decision = "forwarded"
    error_code: str | None = None
    upstream_ms: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    ratelimit_remaining: bytes | None = None
    waited_ms: float = 0.0
    retries: int = 0
    throttled: int = 0  # InvoisX's 429 answers to this call, retried attempts included
    sent: bool = False  # bytes of the request were handed to a connection to InvoisX
    # With an Idempotency-Key: what became of the key (kept, released, unknown, replayed).
    idempotency: str | None = None

    def refused(self, error: ProxyError, bytes_out: int) -> None:
        """The proxy answered `error` itself (`bytes_out` body bytes)."""
        self.status = error.status
        self.decision = error.decision
        self.error_code = error.error_code
        self.bytes_out = bytes_out
        if error.permission is not None:
            self.required = error.permission

    def answered(self, status: int, ratelimit_remaining: bytes | None) -> None:
        """InvoisX's status line went to the client."""
        self.status = status
        self.ratelimit_remaining = ratelimit_remaining

    def replayed(self, status: int, bytes_out: int) -> None:
        """A repeated Idempotency-Key got the first call's answer again."""
        self.status = status
        self.decision = "replayed"
        self.bytes_out = bytes_out

    def aborted(self, error: ProxyError) -> None:
        """The call ended with `error` after its answer had started (InvoisX failed
        mid-answer, the shutdown grace ran out, a bug): the status stays the one the client
        got."""
        self.decision = error.decision
        self.error_code = error.error_code

    def client_gone(self) -> None:
        """The client left early: not a server failure, so no error response."""
        self.status = self.status or _CLIENT_CLOSED
        self.decision = "upstream_error"
        self.error_code = ErrorCode.CLIENT_DISCONNECTED

    def client_stalled(self) -> None:
        """The client stopped reading the answer, which was then cut off."""
        self.decision = "upstream_error"
        self.error_code = ErrorCode.CLIENT_TIMEOUT

    def body_cut_short(self) -> None:
        """The client's connection closed before its request body was complete. Nobody is
        left to answer, but the call was the client's fault, not InvoisX's."""
        self.status = BODY_INCOMPLETE.status
        self.decision = BODY_INCOMPLETE.decision
        self.error_code = BODY_INCOMPLETE.error_code
