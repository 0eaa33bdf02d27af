"""Idempotency-Keys on Redis: one claim for every proxy that shares it, surviving restarts.

A claim is one run of `idempotency.lua`: the key's hash is created as `pending`, owned by the
claiming call, with a lease (the upstream timeout and a margin); only its owner finishes it,
storing the answer, releasing the key, or marking it `unknown`. A proxy that dies holding a
claim never finishes it: once the lease is over the key reads `unknown`, since its call may
have reached InvoisX. Waiters on any proxy poll the key until it settles.

While Redis does not answer, a call with a key is refused (503) and not sent: without the
store, nothing guards it against a second submission. A finish that cannot be written leaves
the key `pending`, so it too ends `unknown`, never free for a resend.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from importlib.resources import files
from typing import Any

import orjson
from structlog.typing import FilteringBoundLogger

from proxy import errors
from proxy.stages.idempotency import Outcome, StoredResponse
from proxy.store.state import StateStore

__all__ = ["LEASE_MARGIN", "SharedIdempotency"]

# Seconds a claim's lease outlasts the upstream timeout: the answer's relay, and the clocks.
LEASE_MARGIN = 5.0
_FIRST_POLL, _LONGEST_POLL = 0.02, 0.25
# A command that timed out while the breaker stays closed is asked again, this often, for at
# most this long: one slow reply (a busy proxy) is no reason to refuse a call.
_ASK_AGAIN, _PATIENCE = 0.05, 1.0
_SOURCE = files("proxy.store").joinpath("idempotency.lua").read_text()


class SharedIdempotency:
    """Keys in Redis under `prefix`; see the module docstring."""

    def __init__(
        self,
        store: StateStore,
        *,
        prefix: str,
        lease: float,
        ttl: float,
        log: FilteringBoundLogger,
    ) -> None:
        self._store = store
        self._script = store.script(_SOURCE)
        self._prefix = prefix
        self._lease_ms = round(lease * 1000)
        self._ttl_ms = round(ttl * 1000)
        self._log = log

    async def claim(self, key: str, fingerprint: str, owner: str) -> StoredResponse | None:
        poll = _FIRST_POLL
        while True:
            args = (fingerprint, self._lease_ms, self._ttl_ms)
            reply = await self._run_patiently(key, "claim", owner, *args)
            if reply is None:
                # The claim may have been made and its reply lost: undone, by its owner only.
                await self._run(key, "finish", owner, "released", self._ttl_ms)
                raise errors.idempotency_store_unavailable()
            state = _text(reply[0])
            if state == "claimed":
                return None
            if state == "reused":
                raise errors.idempotency_key_reused()
            if state == "unknown":
                raise errors.idempotency_outcome_unknown()
            if state == "done":
                return _answer(reply[1:])
            # In flight on some proxy: look again, no later than when its lease ends.
            await asyncio.sleep(min(poll, int(reply[1]) / 1000))
            poll = min(poll * 2, _LONGEST_POLL)

    async def finish(self, key: str, owner: str, outcome: Outcome) -> None:
        if isinstance(outcome, StoredResponse):
            headers = [
                [name.decode("latin-1"), value.decode("latin-1")] for name, value in outcome.headers
            ]
            body, kept = outcome.body or b"", int(outcome.body is not None)
            written = await self._run_patiently(
                key,
                "finish",
                owner,
                "done",
                self._ttl_ms,
                outcome.status,
                orjson.dumps(headers),
                body,
                kept,
            )
        else:
            written = await self._run_patiently(key, "finish", owner, outcome, self._ttl_ms)
        if written is None:
            # The key stays pending: once its lease is over it reads unknown, never free.
            self._log.warning(
                "idempotency_outcome_not_stored",
                outcome=outcome if isinstance(outcome, str) else "kept",
            )

    async def _run_patiently(self, key: str, op: str, owner: str, *args: Any) -> Any:
        """`_run`, asked again after a timeout while the breaker stays closed (both operations
        may run twice: a claim already the owner's is granted again, a finish rewritten)."""
        deadline = time.monotonic() + _PATIENCE
        while True:
            reply = await self._run(key, op, owner, *args)
            if reply is not None or not self._store.up or time.monotonic() >= deadline:
                return reply
            await asyncio.sleep(_ASK_AGAIN)

    async def _run(self, key: str, op: str, owner: str, *args: Any) -> Any:
        # Hashed: a client's key may hold any visible character, and names nothing here.
        name = f"{self._prefix}idempotency:{hashlib.sha256(key.encode()).hexdigest()}"
        return await self._store.run(self._script, [name], [op, owner, *args])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _answer(fields: list[Any]) -> StoredResponse:
    status, headers, body, kept = fields
    pairs = orjson.loads(headers)
    return StoredResponse(
        int(status),
        [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs],
        bytes(body) if int(kept) else None,
    )
