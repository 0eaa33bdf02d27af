"""No double submission: a repeated `Idempotency-Key` gets the first answer, not a second call.

A client may send `Idempotency-Key` on POST, PUT, PATCH and DELETE. The proxy remembers the key
(per client) with a hash of the request; a repeat of the same request is answered from memory
without calling InvoisX, a repeat still in flight waits for the first, and the same key on a
different request is refused. A client that leaves does not cut its call short: the answer is
kept for its retry.

What a key becomes depends on how far its call got:
- not sent (no connection, refused here): released, so the client can try again;
- answered by InvoisX: kept, except after a 5xx, 408, 429 or a refusal of the token itself,
  which release it;
- sent but never answered (a timeout or a broken connection after the request went out, the
  shutdown grace running out, a holder that died): kept as `unknown`, since InvoisX may have
  acted. A repeat gets 409 and is never sent.

Storage sits behind `IdempotencyStore`: `MemoryStore` for one proxy process, and
`store.idempotency.SharedIdempotency` on Redis for replicas and restarts.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from starlette.types import Scope, Send

from proxy import errors
from proxy.config.credentials import TOKEN_LEVEL_ERRORS
from proxy.exchange import Exchange

__all__ = [
    "MAX_KEPT_RESPONSE",
    "BodyBudget",
    "Capture",
    "IdempotencyStore",
    "MemoryStore",
    "Outcome",
    "StoredResponse",
    "forward_once",
    "idempotency_key",
    "request_fingerprint",
]

_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_VALID_KEY = re.compile(rb"[!-~]{1,255}")
# Answers that say the call did not (or may not) take effect: the client must be free to retry.
_NOT_KEPT = frozenset({408, 429})
# InvoisX answers are small JSON; a larger one is remembered as done but not replayed.
MAX_KEPT_RESPONSE = 1_048_576


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A completed answer; `body` None when it was too large to keep."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes | None


class Capture:
    """A copy of the response as it streams to the client, up to `limit` body bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.truncated = False
        self.complete = False

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The answer's status and the headers the client gets."""
        self.status = status
        self.headers = headers

    def add(self, chunk: bytes) -> None:
        """Body bytes as the client gets them; past `limit` only `truncated` is kept."""
        if len(self.body) + len(chunk) > self.limit:
            self.truncated = True
        elif not self.truncated:
            self.body += chunk


# What becomes of a claimed key: its answer kept, the key released, or its outcome unknown.
Outcome = StoredResponse | Literal["released", "unknown"]


class IdempotencyStore(Protocol):
    """Where keys and their answers live."""

    async def claim(self, key: str, fingerprint: str, owner: str) -> StoredResponse | None:
        """None: the caller (`owner`, unique to its call) goes ahead and must `finish`. Else
        the stored answer to replay.

        Waits while the same key is in flight; raises 422 for the same key on another request,
        409 when the key's outcome is unknown.
        """

    async def finish(self, key: str, owner: str, outcome: Outcome) -> None:
        """Record what became of the key's call, if `owner` still holds the key."""


class BodyBudget:
    """The request bytes that calls with an Idempotency-Key hold in memory at once, bounded
    (INVOISX_PROXY_MAX_BUFFERED_BYTES): such a call reads its whole body before it goes out."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.held = 0

    @contextmanager
    def holding(self) -> Iterator[Callable[[int], None]]:
        """A `hold(size)` that takes `size` bytes from the budget as they are read (503 when
        they would exceed it, 413 when one body alone would); all is given back on leaving."""
        taken = 0

        def hold(size: int) -> None:
            nonlocal taken
            if taken + size > self._limit:
                # Would not fit even alone: waiting would not help, unlike the 503 below.
                raise errors.held_body_too_large(self._limit)
            if self.held + size > self._limit:
                raise errors.bodies_busy()
            self.held += size
            taken += size

        try:
            yield hold
        finally:
            self.held -= taken


def idempotency_key(scope: Scope) -> bytes | None:
    """The request's Idempotency-Key, when its method can have one; 400 when malformed."""
    if scope["method"] not in _UNSAFE_METHODS:
        return None
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"idempotency-key":
            if not _VALID_KEY.fullmatch(value):
                raise errors.idempotency_key_invalid()
            return value
    return None


def request_fingerprint(scope: Scope, body: bytes) -> str:
    """What makes two requests the same request: method, path, query and body."""
    digest = hashlib.sha256()
    for part in (scope["method"].encode(), scope["raw_path"], scope["query_string"], body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    owner: str
    expires_at: float
    done: asyncio.Event = field(default_factory=asyncio.Event)
    response: StoredResponse | None = None
    unknown: bool = False

    @property
    def settled(self) -> bool:
        return self.response is not None or self.unknown


class MemoryStore:
    """Keys in this process's memory: bounded in count and in stored bytes, expired by TTL."""

    def __init__(self, *, ttl: float, max_entries: int, max_bytes: int) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._bytes = 0

    async def claim(self, key: str, fingerprint: str, owner: str) -> StoredResponse | None:
        while True:
            self._expire(time.monotonic())
            entry = self._entries.get(key)
            if entry is None:
                self._make_room()
                self._entries[key] = _Entry(fingerprint, owner, time.monotonic() + self._ttl)
                return None
            if entry.fingerprint != fingerprint:
                raise errors.idempotency_key_reused()
            if entry.unknown:
                raise errors.idempotency_outcome_unknown()
            if entry.response is not None:
                return entry.response
            # The first call is in flight: wait for its outcome, then look again.
            await entry.done.wait()

    async def finish(self, key: str, owner: str, outcome: Outcome) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.owner != owner:
            return
        if outcome == "released":
            del self._entries[key]
        elif outcome == "unknown":
            entry.unknown = True
        else:
            entry.response = outcome
            self._bytes += _size(outcome)
            self._evict_over_budget()
        entry.done.set()

    def _expire(self, now: float) -> None:
        expired = []
        for key, entry in self._entries.items():  # oldest first
            if entry.expires_at > now:
                break
            if entry.settled:  # a key in flight stays until it finishes
                expired.append(key)
        for key in expired:
            self._drop(key)

    def _make_room(self) -> None:
        if len(self._entries) < self._max_entries:
            return
        if not self._drop_oldest_kept():
            raise errors.idempotency_store_full()

    def _evict_over_budget(self) -> None:
        while self._bytes > self._max_bytes and self._drop_oldest_kept():
            pass

    def _drop_oldest_kept(self) -> bool:
        # Keys in flight are never dropped, their waiters depend on them; nor keys whose outcome
        # is unknown before their time: forgotten, they would let the call go out again.
        for key, entry in self._entries.items():
            if entry.response is not None:
                self._drop(key)
                return True
        return False

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        if entry.response is not None:
            self._bytes -= _size(entry.response)
        entry.done.set()


def _size(response: StoredResponse) -> int:
    return len(response.body or b"") + sum(len(n) + len(v) for n, v in response.headers)


def _outcome(capture: Capture, exchange: Exchange) -> Outcome:
    if not capture.complete:
        # Sent and not (wholly) answered: InvoisX may have acted.
        return "unknown" if exchange.sent else "released"
    if capture.status >= 500 or capture.status in _NOT_KEPT:
        return "released"
    if exchange.error_code in TOKEN_LEVEL_ERRORS:
        return "released"  # about the token, not the request: a retry after a rotation goes out
    body = None if capture.truncated else bytes(capture.body)
    return StoredResponse(capture.status, capture.headers, body)


async def _replay(send: Send, stored: StoredResponse, exchange: Exchange) -> None:
    if stored.body is None:
        raise errors.response_not_kept()
    headers = [(name, value) for name, value in stored.headers if name != b"x-request-id"]
    headers += [(b"x-request-id", exchange.request_id.encode()), (b"idempotent-replayed", b"true")]
    await send({"type": "http.response.start", "status": stored.status, "headers": headers})
    await send({"type": "http.response.body", "body": stored.body})
    exchange.replayed(stored.status, len(stored.body))


async def forward_once(
    store: IdempotencyStore,
    key: str,
    fingerprint: str,
    forward: Callable[[Capture], Awaitable[None]],
    send: Send,
    exchange: Exchange,
) -> None:
    """Replay the stored answer for `key`, or `forward` once and record what became of it."""
    owner = secrets.token_hex(8)
    try:
        stored = await store.claim(key, fingerprint, owner)
    except errors.ProxyError as error:
        if error.error_code == errors.ErrorCode.IDEMPOTENCY_OUTCOME_UNKNOWN:
            exchange.idempotency = "unknown"
        raise
    if stored is not None:
        exchange.idempotency = "replayed"
        await _replay(send, stored, exchange)
        return
    capture = Capture(MAX_KEPT_RESPONSE)
    try:
        await forward(capture)
    finally:
        outcome = _outcome(capture, exchange)
        exchange.idempotency = outcome if isinstance(outcome, str) else "kept"
        # Recorded even when the call is cancelled (the shutdown grace ran out).
        await asyncio.shield(store.finish(key, owner, outcome))
