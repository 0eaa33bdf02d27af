"""The token's budget: calls per InvoisX window, and who may spend what is left of it.

InvoisX counts a token's calls in windows of a minute and says on every answer how many are
left and when the window resets. The budget mirrors that window: a call is admitted only while
the calls counted in the window stay within the limit, counted when admitted, so no answer
arrives too late to prevent a 429. InvoisX's own counts correct the mirror (others may spend
the token too), its reset places the window, and its 429 spends the window until its
Retry-After.

Fairness. Each client's recent rate (calls a minute, decaying over about a minute) says what
it will likely need in the rest of the window. A client above its fair share (the limit over
the clients active lately) leaves that need, prorated to the time left, to the clients below
theirs, and a little (`NEWCOMERS`) to apps not seen lately; every client leaves what remains
of the others' `reserved_per_minute`. So a batch job spends all that the interactive app will
not, and the app never waits for the next window.

The rules run here for one proxy and as a Redis script (`store/budget.lua`) for proxies that
share a token; `tests/stages/test_budget.py` holds both to the same cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["MARGIN", "NEWCOMERS", "WINDOW", "Verdict", "WindowBudget"]

WINDOW = 60.0  # InvoisX counts calls per minute
# Seconds past InvoisX's reset before the next window opens here: its clock and ours differ.
MARGIN = 1.0
# A rate is estimated over at least this many seconds: one call is not a burst of thousands.
_MIN_AGE = 5.0
_ACTIVE = 0.5  # a decayed count below this is a client no longer active
_FORGOTTEN = 0.05  # and below this one no longer remembered
_SHORTEST_WAIT = 0.05
# The share of the limit a client above its fair share leaves to apps not seen lately.
NEWCOMERS = 0.05


class Verdict(NamedTuple):
    """A decision: `wait` 0 means admitted, else the seconds after which asking again may
    succeed; `reset` is when the current window ends (Unix time), `used` the calls counted."""

    wait: float
    reset: float
    used: int


@dataclass(slots=True)
class _Use:
    """One client's calls: a count decaying over a minute, and its count in one window."""

    count: float
    stamp: float
    first: float
    window: float = 0.0
    used: int = 0

    def decayed(self, now: float) -> float:
        return self.count * math.exp((self.stamp - now) / WINDOW)

    def rate(self, now: float) -> float:
        """Calls a minute: the decayed count, corrected for a client seen less than a minute."""
        age = max(now - self.first, _MIN_AGE)
        return self.decayed(now) / -math.expm1(-age / WINDOW)


class WindowBudget:
    """One token's window in this process; times are Unix seconds, given by the caller."""

    def __init__(self, per_minute: int, *, reset: float = 0.0, used: int = 0) -> None:
        self.per_minute = per_minute
        self.reset = reset  # 0: no window yet
        self.used = used
        self._clients: dict[str, _Use] = {}

    def take(
        self, now: float, client: str, cap: int | None, reservations: Mapping[str, int]
    ) -> Verdict:
        """Admit one call by `client` (at most `cap` per window) or say how long to wait."""
        self._roll(now)
        rates = self._rates(now)
        own = self._clients.get(client)
        own_used = own.used if own is not None and own.window == self.reset else 0
        if cap is not None and own_used >= cap:
            return self._verdict(self.reset + MARGIN - now)
        held, holding_rate = self._held(now, client, own_used, rates, reservations)
        left = self.per_minute - self.used
        if left < 1:
            return self._verdict(self.reset + MARGIN - now)
        if left - 1 < held:
            # What is held shrinks as the window runs out, at the rate it is held for.
            return self._verdict(min((held - left + 1) * WINDOW / holding_rate, self._left(now)))
        self._count(now, client)
        return Verdict(0.0, self.reset, self.used)

    def refund(self, now: float, client: str) -> None:
        """Give back one call admitted for `client` that never went to InvoisX."""
        self._roll(now)
        own = self._clients.get(client)
        if own is None or own.window != self.reset:
            return  # counted in a window that is over
        self.used = max(0, self.used - 1)
        own.used = max(0, own.used - 1)
        own.count = max(0.0, own.count - 1)

    def learn(
        self,
        now: float,
        status: int,
        remaining: int | None,
        reset: int | None,
        retry_after: int | None,
    ) -> None:
        """Correct the window from InvoisX's answer: its remaining count and reset, its 429."""
        self._roll(now)
        if remaining is not None and reset is not None and now - MARGIN < reset <= now + WINDOW:
            theirs = max(0, self.per_minute - remaining)
            if reset > self.reset:
                # InvoisX is in a later window than ours: its count is the one to go by.
                self.reset, self.used = float(reset), theirs
            elif reset < self.reset and now < reset:
                # Ours opened early (or was a guess): InvoisX's window is still running.
                self._move(float(reset))
                self.used = max(self.used, theirs)
            elif reset == self.reset:
                self.used = max(self.used, theirs)
        if status == 429:
            # The window is spent, and ends when InvoisX says calls may come again.
            self._move(now + (WINDOW if retry_after is None else retry_after) - MARGIN)
            self.used = self.per_minute

    def _move(self, reset: float) -> None:
        """Move the end of the current window; what each client used in it stays counted."""
        for use in self._clients.values():
            if use.window == self.reset:
                use.window = reset
        self.reset = reset

    def _roll(self, now: float) -> None:
        """Open the next window once the current one is over (the first one now)."""
        if not self.reset:
            self.reset, self.used = now + WINDOW, 0
        elif now >= self.reset + MARGIN:
            self.reset += WINDOW * (math.floor((now - MARGIN - self.reset) / WINDOW) + 1)
            self.used = 0

    def _rates(self, now: float) -> dict[str, float]:
        """Each remembered client's rate; forgets those idle for minutes."""
        rates = {}
        for name, use in list(self._clients.items()):
            if use.decayed(now) < _FORGOTTEN:
                del self._clients[name]
            else:
                rates[name] = use.rate(now)
        return rates

    def _held(
        self,
        now: float,
        client: str,
        own_used: int,
        rates: Mapping[str, float],
        reservations: Mapping[str, int],
    ) -> tuple[int, float]:
        """Calls `client` must leave to the others in this window, and the calls a minute
        they are held for."""
        # The share of a window still to come (the margin past its end counts as its end).
        to_come = min(self._left(now), WINDOW) / WINDOW
        active = {name for name, rate in rates.items() if self._is_active(name, now)}
        fair = self.per_minute / len(active | {client})
        # Within its own reservation a client is never held back for lighter ones.
        heavy = rates.get(client, 0.0) >= fair and own_used >= reservations.get(client, 0)
        held, holding_rate = 0, 0.0
        for name in (set(reservations) | (active if heavy else set())) - {client}:
            need, rate = 0, 0.0
            reserved = reservations.get(name, 0)
            if reserved:
                use = self._clients.get(name)
                used = use.used if use is not None and use.window == self.reset else 0
                need = min(max(0, reserved - used), math.ceil(reserved * to_come))
                rate = float(reserved)
            light = rates.get(name, 0.0)
            if heavy and name in active and light < fair:
                need = max(need, math.ceil(light * to_come))
                rate = max(rate, light)
            if need:
                held += need
                holding_rate += rate
        if heavy:
            # And room for apps not seen lately, whose first call should not wait either.
            held += math.ceil(self.per_minute * NEWCOMERS * to_come)
            holding_rate += self.per_minute * NEWCOMERS
        return held, holding_rate

    def _is_active(self, name: str, now: float) -> bool:
        return self._clients[name].decayed(now) >= _ACTIVE

    def remember(self, now: float, client: str, calls: int = 1) -> None:
        """Count calls admitted elsewhere (by the shared budget) in `client`'s recent rate,
        so that this budget is fair from its first call when it has to stand in."""
        self._remember(now, client, calls)

    def serves(self, client: str) -> bool:
        """Whether `client` called lately (within the last few minutes)."""
        return client in self._clients

    def place(self, per_minute: int, reset: float, used: int) -> None:
        """Set the limit and the window, keeping what is known of the clients."""
        self.per_minute, self.reset, self.used = per_minute, reset, used

    def _remember(self, now: float, client: str, calls: int) -> _Use:
        own = self._clients.get(client)
        if own is None or own.decayed(now) < _FORGOTTEN:
            own = self._clients[client] = _Use(0.0, now, now)
        own.count = own.decayed(now) + calls
        own.stamp = now
        return own

    def _count(self, now: float, client: str) -> None:
        own = self._remember(now, client, 1)
        if own.window != self.reset:
            own.window, own.used = self.reset, 0
        own.used += 1
        self.used += 1

    def _left(self, now: float) -> float:
        """Seconds until the next window opens here."""
        return max(0.0, self.reset + MARGIN - now)

    def _verdict(self, wait: float) -> Verdict:
        return Verdict(max(wait, _SHORTEST_WAIT), self.reset, self.used)
