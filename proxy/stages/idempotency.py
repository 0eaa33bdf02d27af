"""No double submission: a repeated `Idempotency-Key` gets the first answer, not a second call.

A client may send `Idempotency-Key` on POST, PUT, PATCH and DELETE. The proxy remembers the key
(per client) with a hash of the request; a repeat of the same request is answered from memory
without calling InvoisX, a repeat still in flight waits for the first, and the same key on a
different request is refused. Only completed answers are kept: after a 5xx, 408, 429, a
refusal of the token itself or a broken connection the key is released so the client can try
again. A client that leaves does not cut its call short: the answer is kept for its retry.

Storage sits behind `IdempotencyStore`; `MemoryStore` serves one proxy process. Replicas
would need a shared implementation (Redis, say) of the same three methods.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

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


class IdempotencyStore(Protocol):
    """Where keys and their answers live."""

    async def claim(self, key: str, fingerprint: str) -> StoredResponse | None:
        """None: the caller goes ahead and must `finish`. Else the stored answer to replay.

        Waits while the same key is in flight; raises 422 for the same key on another request.
        """

    def finish(self, key: str, response: StoredResponse | None) -> None:
        """Keep `response` for the key, or release the key when None."""


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
    expires_at: float
    done: asyncio.Event = field(default_factory=asyncio.Event)
    response: StoredResponse | None = None


class MemoryStore:
    """Keys in this process's memory: bounded in count and in stored bytes, expired by TTL."""

    def __init__(self, *, ttl: float, max_entries: int, max_bytes: int) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._bytes = 0

    async def claim(self, key: str, fingerprint: str) -> StoredResponse | None:
        while True:
            self._expire(time.monotonic())
            entry = self._entries.get(key)
            if entry is None:
                self._make_room()
                self._entries[key] = _Entry(fingerprint, time.monotonic() + self._ttl)
                return None
            if entry.fingerprint != fingerprint:
                raise errors.idempotency_key_reused()
            if entry.response is not None:
                return entry.response
            # The first call is in flight: wait for its outcome, then look again.
            await entry.done.wait()

    def finish(self, key: str, response: StoredResponse | None) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        if response is None:
            del self._entries[key]
        else:
            entry.response = response
            self._bytes += _size(response)
            self._evict_over_budget()
        entry.done.set()

    def _expire(self, now: float) -> None:
        expired = []
        for key, entry in self._entries.items():  # oldest first
            if entry.expires_at > now:
                break
            if entry.response is not None:  # a key in flight stays until it finishes
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
        # Keys still in flight are never dropped: their waiters depend on them.
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


def _keepable(capture: Capture, error_code: str | None) -> StoredResponse | None:
    if not capture.complete or capture.status >= 500 or capture.status in _NOT_KEPT:
        return None
    if error_code in TOKEN_LEVEL_ERRORS:
        return None  # about the token, not the request: a retry after a rotation must go out
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
    """Replay the stored answer for `key`, or `forward` once and keep what it answered."""
    stored = await store.claim(key, fingerprint)
    if stored is not None:
        await _replay(send, stored, exchange)
        return
    capture = Capture(MAX_KEPT_RESPONSE)
    try:
        await forward(capture)
    finally:
        store.finish(key, _keepable(capture, exchange.error_code))
