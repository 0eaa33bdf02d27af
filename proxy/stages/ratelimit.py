"""Sharing the token's rate limit (60 calls a minute) between the apps behind the proxy.

The budget decides (`stages/budget` in this process, `store/budget` on Redis for proxies that
share the token); this stage waits. A call the budget cannot admit yet waits for the time the
budget names and asks again, at most INVOISX_RATE_LIMIT_MAX_WAIT in all: a call that could not
be admitted within it is refused at once with InvoisX's 429 and a Retry-After, rather than
after holding its connection for nothing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Protocol

from proxy import errors
from proxy.errors import ProxyError
from proxy.stages.budget import Verdict, WindowBudget

__all__ = ["Admission", "Budget", "MemoryBudget", "RateLimiter", "header_number"]

_NO_RESERVATIONS: Mapping[str, int] = MappingProxyType({})


def header_number(value: bytes | None) -> int | None:
    """A header value that is a plain whole number (a count, seconds, a Unix time), or None;
    more than ten digits is no sane value and would overflow the arithmetic."""
    if value is None or not value.isdigit() or len(value) > 10:
        return None
    return int(value)


class Budget(Protocol):
    """Where calls are counted: in this process or shared on Redis."""

    per_minute: int

    async def take(self, client: str, cap: int | None, reservations: Mapping[str, int]) -> Verdict:
        """Admit one call by `client` (at most `cap` a window), or say how long to wait."""

    async def refund(self, client: str) -> None:
        """Give back one call admitted for `client` that never went to InvoisX."""

    async def learn(
        self, status: int, remaining: int | None, reset: int | None, retry_after: int | None
    ) -> None:
        """Correct the budget from InvoisX's answer."""


class MemoryBudget:
    """The budget of one proxy, in its own memory (INVOISX_PROXY_REDIS_URL unset)."""

    def __init__(self, per_minute: int, *, wall: Callable[[], float] = time.time) -> None:
        self.per_minute = per_minute
        self._window = WindowBudget(per_minute)
        self._wall = wall

    async def take(self, client: str, cap: int | None, reservations: Mapping[str, int]) -> Verdict:
        return self._window.take(self._wall(), client, cap, reservations)

    async def refund(self, client: str) -> None:
        self._window.refund(self._wall(), client)

    async def learn(
        self, status: int, remaining: int | None, reset: int | None, retry_after: int | None
    ) -> None:
        self._window.learn(self._wall(), status, remaining, reset, retry_after)


class RateLimiter:
    """Calls wait here, in bounded numbers and for a bounded time, until the budget admits
    them."""

    def __init__(
        self,
        budget: Budget,
        *,
        max_wait: float,
        max_queue: int,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.budget = budget
        self._max_wait = max_wait
        self._max_queue = max_queue
        # `clock` measures waits; `wall` dates the Retry-After in InvoisX's terms (Unix).
        self._clock = clock
        self._wall = wall
        self._queued = 0

    async def acquire(
        self,
        client: str,
        cap: int | None = None,
        reservations: Mapping[str, int] = _NO_RESERVATIONS,
    ) -> float:
        """Wait for the budget to admit one upstream call by `client`; the seconds waited.

        Raises 429 `RATE_LIMIT_EXCEEDED` when the queue is full or no admission can come
        within INVOISX_RATE_LIMIT_MAX_WAIT.
        """
        verdict = await self.budget.take(client, cap, reservations)
        if not verdict.wait:
            return 0.0
        if self._queued >= self._max_queue:
            raise self._refusal(verdict, "the queue of waiting calls is full")
        started = self._clock()
        self._queued += 1
        try:
            while verdict.wait:
                if self._clock() + verdict.wait > started + self._max_wait:
                    raise self._refusal(verdict, "no capacity comes up in time")
                await asyncio.sleep(verdict.wait)
                verdict = await self.budget.take(client, cap, reservations)
        finally:
            self._queued -= 1
        return self._clock() - started

    async def learn(self, status: int, headers: Mapping[bytes, bytes]) -> None:
        """Tell the budget what InvoisX answered (`headers` by lowercase name): its remaining
        count, its reset and the Retry-After of a 429."""
        remaining = header_number(headers.get(b"x-ratelimit-remaining"))
        reset = header_number(headers.get(b"x-ratelimit-reset"))
        retry_after = header_number(headers.get(b"retry-after")) if status == 429 else None
        if remaining is not None or status == 429:
            await self.budget.learn(status, remaining, reset, retry_after)

    def _refusal(self, verdict: Verdict, why: str) -> ProxyError:
        retry_after = max(1, math.ceil(verdict.wait))
        reset = math.ceil(self._wall() + verdict.wait)
        return errors.rate_limited(why, self.budget.per_minute, retry_after, reset)


class Admission:
    """One call's use of the rate limit: the pipeline admits its first attempt, the
    forwarder each retry; without a limiter (INVOISX_RATE_LIMIT_PER_MINUTE=0) all pass."""

    __slots__ = ("_cap", "_client", "_limiter", "_reservations")

    def __init__(
        self,
        limiter: RateLimiter | None,
        client: str,
        cap: int | None,
        reservations: Mapping[str, int],
    ) -> None:
        self._limiter = limiter
        self._client = client
        self._cap = cap
        self._reservations = reservations

    async def admit(self) -> float:
        """Wait for capacity for one attempt; the seconds waited (429 when none comes)."""
        if self._limiter is None:
            return 0.0
        return await self._limiter.acquire(self._client, self._cap, self._reservations)

    async def learn(self, status: int, headers: Mapping[bytes, bytes]) -> None:
        """Tell the limiter what InvoisX answered (see `RateLimiter.learn`)."""
        if self._limiter is not None:
            await self._limiter.learn(status, headers)

    async def refund(self) -> None:
        """Give back what the last `admit` took: the call did not go to InvoisX after all."""
        if self._limiter is not None:
            await self._limiter.budget.refund(self._client)
