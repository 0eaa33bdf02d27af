"""The budget shared by every proxy that holds the token, on Redis; a share of it while apart.

Each decision is one run of `budget.lua` (EVALSHA) on a hash keyed by the token's fingerprint,
timed by Redis's clock: what is counted is what is checked, whatever the hosts' clocks say.
Every proxy keeps a heartbeat beside it, so each knows how many share the token.

While Redis is unreachable, a proxy neither admits the whole limit (which every other proxy
would do too) nor refuses everything: it admits its share, the limit divided by the proxies
it last saw alive, in a window of its own placed where the shared one was, fair from the
first call since it kept count of its clients all along. Once a heartbeat gets through again,
what it admitted meanwhile is added to the shared count, and decisions are shared again.

Under a high limit the script may grant a short lease of several calls (`budget.lua`), so a
busy proxy asks Redis once for many calls; at InvoisX's 60 a minute every call is one run.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.resources import files

from proxy.config.credentials import TokenHolder
from proxy.metrics import Metrics
from proxy.stages.budget import MARGIN, Verdict, WindowBudget
from proxy.store.state import StateStore

__all__ = ["HEARTBEAT", "SharedBudget"]

HEARTBEAT = 1.0  # seconds between heartbeats, and so the longest a recovery goes unnoticed
_ALIVE = 5 * HEARTBEAT  # a proxy whose last heartbeat is older counts as gone
_LEASE_SECONDS = 1.0
_ASK_AGAIN = 0.1  # seconds before a call whose take timed out asks again
_SOURCE = files("proxy.store").joinpath("budget.lua").read_text()


@dataclass(slots=True)
class _Lease:
    """Calls the shared budget granted a client at once, to spend here without asking."""

    left: int
    reset_ms: int  # the window they were counted in
    expires: float  # monotonic: leases are short, so what goes unused is soon given back


class SharedBudget:
    """The budget in Redis under `prefix`, for the current token; see the module docstring."""

    def __init__(
        self,
        store: StateStore,
        tokens: TokenHolder,
        per_minute: int,
        *,
        prefix: str,
        metrics: Metrics,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.per_minute = per_minute
        self._store = store
        self._script = store.script(_SOURCE)
        self._tokens = tokens
        self._prefix = prefix
        self._metrics = metrics
        self._wall = wall
        self._id = secrets.token_hex(8)
        self._leases: dict[str, _Lease] = {}
        # The shared window as of the latest reply (reset in ms, calls counted), and the
        # proxies alive as of the latest heartbeat.
        self._known = (0, 0)
        self.proxies = 1
        # This proxy's clients, counted as the shared budget admits them; while Redis is
        # unreachable, also its share of the window, and the calls admitted in it.
        self._local = WindowBudget(per_minute)
        self._apart = False
        self._admitted_apart = 0

    async def take(self, client: str, cap: int | None, reservations: Mapping[str, int]) -> Verdict:
        lease = self._leases.get(client)
        if lease is not None and lease.left and time.monotonic() < lease.expires:
            lease.left -= 1
            return Verdict(0.0, lease.reset_ms / 1000, self._known[1])
        returned, returned_window = (lease.left, lease.reset_ms) if lease else (0, 0)
        pairs = [item for pair in reservations.items() for item in pair]
        args = ["take", self.per_minute, MARGIN, client, cap or 0, returned, returned_window]
        reply = await self._store.run(self._script, [self._key("budget")], [*args, *pairs])
        if reply is None and self._store.up:
            # A timeout, the breaker not open yet: not admitted (Redis may have counted it).
            known_reset, known_used = self._known
            return Verdict(_ASK_AGAIN, known_reset / 1000, known_used)
        if reply is None:
            return self._take_apart(client, cap, reservations)
        self._leases.pop(client, None)
        wait_ms, reset_ms, used, granted, left_ms = reply
        self._known = (reset_ms, used)
        if granted:
            self._local.remember(self._wall(), client, granted)
            if granted > 1:
                expires = time.monotonic() + min(_LEASE_SECONDS, left_ms / 1000)
                self._leases[client] = _Lease(granted - 1, reset_ms, expires)
        return Verdict(wait_ms / 1000, reset_ms / 1000, used)

    async def refund(self, client: str) -> None:
        lease = self._leases.get(client)
        if lease is not None and time.monotonic() < lease.expires:
            lease.left += 1  # back to the lease: it was counted in Redis with it
            return
        args = ["refund", self.per_minute, MARGIN, client]
        if await self._store.run(self._script, [self._key("budget")], args) is None:
            self._local.refund(self._wall(), client)

    async def learn(
        self, status: int, remaining: int | None, reset: int | None, retry_after: int | None
    ) -> None:
        if status != 429 and self._nothing_new(remaining, reset):
            return  # the shared count is already at least InvoisX's: no write needed
        args = ["learn", self.per_minute, MARGIN, status]
        args += [-1 if value is None else value for value in (remaining, reset, retry_after)]
        if await self._store.run(self._script, [self._key("budget")], args) is None:
            self._go_apart()
            # InvoisX's remaining is the whole token's: this proxy's share of it.
            share = self._local.per_minute
            mine = None if remaining is None else remaining * share // self.per_minute
            self._local.learn(self._wall(), status, mine, reset, retry_after)

    async def heartbeat(self) -> None:
        """Tell Redis this proxy is alive and learn how many are; after an outage, hand back
        what was admitted apart and share decisions again."""
        if not self._store.up:
            # Connections from before the outage may be dead: start afresh.
            await self._store.reconnect()
        alive = await self._store.probe(
            self._script, [self._key("proxies")], ["beat", self._id, _ALIVE]
        )
        if alive is None:
            return
        self.proxies = max(1, int(alive))
        self._metrics.state_store_proxies(self.proxies)
        if self._store.up:
            return
        if self._apart and self._admitted_apart:
            reset_ms = round(self._local.reset * 1000)
            args = ["merge", self.per_minute, MARGIN, reset_ms, self._admitted_apart]
            if await self._store.probe(self._script, [self._key("budget")], args) is None:
                return
        self._apart, self._admitted_apart = False, 0
        self._store.recovered()

    async def run(self) -> None:
        """Heartbeats until cancelled."""
        while True:
            await asyncio.sleep(HEARTBEAT)
            await self.heartbeat()

    def describe(self) -> dict[str, object]:
        """For `/readyz`: whether Redis answers and how many proxies share the budget."""
        return {"kind": "redis", "up": self._store.up, "proxies": self.proxies}

    def _key(self, kind: str) -> str:
        return f"{self._prefix}{kind}:{self._tokens.current.fingerprint}"

    def _nothing_new(self, remaining: int | None, reset: int | None) -> bool:
        known_reset, known_used = self._known
        if remaining is None or reset is None or self._apart:
            return remaining is None
        return reset * 1000 == known_reset and self.per_minute - remaining <= known_used

    def _take_apart(self, client: str, cap: int | None, reservations: Mapping[str, int]) -> Verdict:
        self._go_apart()
        # A share holds back only for the apps this proxy serves: the others' proxies hold
        # back for theirs, and a reservation kept where its app never calls is a share lost.
        here = {
            name: calls
            for name, calls in reservations.items()
            if name == client or self._local.serves(name)
        }
        verdict = self._local.take(self._wall(), client, cap, here)
        self._admitted_apart += not verdict.wait
        return verdict

    def _go_apart(self) -> None:
        """Stand in with this proxy's share, in the shared window as last seen."""
        if self._apart:
            return
        self._apart, self._admitted_apart = True, 0
        share = max(1, self.per_minute // self.proxies)
        known_reset, known_used = self._known
        used = math.ceil(known_used * share / self.per_minute)
        self._local.place(share, known_reset / 1000, used)
