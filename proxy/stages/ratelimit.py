"""Sharing the token's rate limit (60 calls a minute) fairly between the apps behind the proxy.

A token bucket holds a minute's worth of calls, so a burst up to the limit passes at once and
capacity then refills steadily. A call that finds none waits in a bounded queue, with no busy
loop: one future per waiting call and one timer for the whole queue.

Fairness: the first half of the bucket goes first come, first served. Below half, calls queue
and capacity is handed out in short rounds, one call per waiting client per round, the client
that used least in the last minute first. So when a batch job and an interactive app burst
together, the app's few calls share the rest of the minute instead of waiting for the next.
InvoisX's own `X-RateLimit-*` headers and 429s correct the bucket, since other users of the
token may spend it too.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping

from proxy import errors
from proxy.errors import ProxyError

__all__ = ["Admission", "RateLimiter", "header_number"]

_DEFAULT_RETRY_AFTER = 60.0  # what InvoisX sends with its own 429s
# Seconds between rounds of the fair queue: long enough for competing calls to gather.
_ROUND = 0.02


def header_number(value: bytes | None) -> int | None:
    """A header value that is a plain whole number (a count, seconds, a Unix time), or None;
    more than ten digits is no sane value and would overflow the arithmetic."""
    if value is None or not value.isdigit() or len(value) > 10:
        return None
    return int(value)


class _Bucket:
    """Tokens refilled continuously up to a minute's worth."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for_one(self) -> float:
        """Seconds until one token is available (0 when one is)."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


class RateLimiter:
    """The token's bucket, per-client buckets, and the fair queue in front of them."""

    def __init__(
        self,
        per_minute: int,
        *,
        max_wait: float,
        max_queue: int,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.per_minute = per_minute
        self._max_wait = max_wait
        self._max_queue = max_queue
        # `clock` measures the buckets and waits; `wall` reads InvoisX's reset times (Unix).
        self._clock = clock
        self._wall = wall
        self._bucket = _Bucket(per_minute, clock())
        self._clients: dict[str, _Bucket] = {}
        # InvoisX said stop (a 429, or nothing remaining until its reset): no calls before this.
        self._blocked_until = 0.0
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        # Calls granted per client, decaying over about a minute: who goes next when several wait.
        self._usage: dict[str, tuple[float, float]] = {}
        self._queued = 0
        self._timer: asyncio.TimerHandle | None = None

    async def acquire(self, client: str, client_per_minute: int | None = None) -> float:
        """Wait for capacity for one upstream call by `client`; return the seconds waited.

        Raises 429 `RATE_LIMIT_EXCEEDED` when the queue is full or the wait would exceed
        INVOISX_RATE_LIMIT_MAX_WAIT.
        """
        now = self._clock()
        own = self._client_bucket(client, client_per_minute, now)
        if not self._queued and self._plenty(now) and self._take(own, now):
            self._note_use(client, now)
            return 0.0
        if self._queued >= self._max_queue:
            raise self._refusal(now, "the queue of waiting calls is full")
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(client, deque()).append(granted)
        self._queued += 1
        # Capacity may be free for this client even while others wait for theirs.
        self._reschedule(now)
        try:
            async with asyncio.timeout(self._max_wait):
                await asyncio.shield(granted)
        except TimeoutError:
            if not granted.done():
                self._withdraw(client, granted)
                raise self._refusal(self._clock(), "no capacity came up in time") from None
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._give_back(own)
            else:
                self._withdraw(client, granted)
            raise
        return self._clock() - now

    def refund(self, client: str) -> None:
        """Give back capacity acquired for a call that never went to InvoisX."""
        self._give_back(self._clients.get(client))

    def learn(self, status: int, headers: Mapping[bytes, bytes]) -> None:
        """Correct the bucket from InvoisX's answer (`headers` by lowercase name): its
        remaining count, reset and 429s."""
        now = self._clock()
        remaining = header_number(headers.get(b"x-ratelimit-remaining"))
        if remaining is not None:
            self._bucket.refill(now)
            self._bucket.tokens = min(self._bucket.tokens, float(remaining))
            reset = header_number(headers.get(b"x-ratelimit-reset"))
            if remaining == 0 and reset is not None:
                self._block(now + max(0.0, reset - self._wall()))
        if status == 429:
            retry_after = header_number(headers.get(b"retry-after"))
            self._bucket.tokens = 0.0
            self._block(now + (_DEFAULT_RETRY_AFTER if retry_after is None else retry_after))

    def _block(self, until: float) -> None:
        self._blocked_until = max(self._blocked_until, until)

    def _client_bucket(self, client: str, per_minute: int | None, now: float) -> _Bucket | None:
        if per_minute is None:
            return None
        bucket = self._clients.get(client)
        if bucket is None or bucket.capacity != per_minute:
            bucket = self._clients[client] = _Bucket(per_minute, now)
        return bucket

    def _plenty(self, now: float) -> bool:
        self._bucket.refill(now)
        return self._bucket.tokens >= self._bucket.capacity / 2

    def _take(self, own: _Bucket | None, now: float) -> bool:
        if now < self._blocked_until:
            return False
        self._bucket.refill(now)
        if own is not None:
            own.refill(now)
        if self._bucket.tokens < 1 or (own is not None and own.tokens < 1):
            return False
        self._bucket.tokens -= 1
        if own is not None:
            own.tokens -= 1
        return True

    def _give_back(self, own: _Bucket | None) -> None:
        # A call granted capacity but cancelled before it went out never spent it.
        self._bucket.tokens = min(self._bucket.capacity, self._bucket.tokens + 1)
        if own is not None:
            own.tokens = min(own.capacity, own.tokens + 1)

    def _withdraw(self, client: str, granted: asyncio.Future[None]) -> None:
        queue = self._waiting.get(client)
        if queue is not None and granted in queue:
            queue.remove(granted)
            self._queued -= 1
            if not queue:
                del self._waiting[client]

    def _note_use(self, client: str, now: float) -> None:
        self._usage[client] = (self._recent_use(client, now) + 1.0, now)

    def _recent_use(self, client: str, now: float) -> float:
        used, stamp = self._usage.get(client, (0.0, now))
        return used * math.exp((stamp - now) / 60.0)

    def _dispatch(self) -> None:
        """Grant capacity one call at a time, to the waiting client that used least lately."""
        self._timer = None
        now = self._clock()
        # One round: at most one call per waiting client, least used first (ties: the longest
        # waiting, as dicts keep insertion order).
        for client in sorted(self._waiting, key=lambda name: self._recent_use(name, now)):
            if not self._take(self._clients.get(client), now):
                continue
            queue = self._waiting[client]
            queue.popleft().set_result(None)
            self._queued -= 1
            self._note_use(client, now)
            del self._waiting[client]
            if queue:  # behind the others at equal use
                self._waiting[client] = queue
        if self._waiting:
            self._schedule(now)

    def _reschedule(self, now: float) -> None:
        """Schedule a round, sooner than the one planned if a newcomer can be served sooner.

        Never later: calls arriving more often than a round must not keep postponing it.
        """
        planned = self._timer
        self._timer = None
        self._schedule(now)
        if planned is None:
            return
        assert self._timer is not None
        if planned.when() <= self._timer.when():
            self._timer.cancel()
            self._timer = planned
        else:
            planned.cancel()

    def _schedule(self, now: float) -> None:
        if self._timer is not None:
            return
        self._bucket.refill(now)
        delay = max(self._blocked_until - now, self._bucket.wait_for_one())
        client_waits = [
            self._clients[client].wait_for_one()
            for client in self._waiting
            if client in self._clients
        ]
        if client_waits and len(client_waits) == len(self._waiting):
            delay = max(delay, min(client_waits))
        # At least a round apart; a little slack so a whole token has refilled by then.
        self._timer = asyncio.get_running_loop().call_later(
            max(_ROUND, delay + 0.001), self._dispatch
        )

    def _refusal(self, now: float, why: str) -> ProxyError:
        self._bucket.refill(now)
        seconds_per_call = 60.0 / self.per_minute
        wait = max(
            self._blocked_until - now,
            self._bucket.wait_for_one() + self._queued * seconds_per_call,
        )
        retry_after = max(1, math.ceil(wait))
        reset = math.ceil(self._wall() + wait)
        return errors.rate_limited(why, self.per_minute, retry_after, reset)


class Admission:
    """One call's use of the rate limit: the pipeline admits its first attempt, the
    forwarder each retry; without a limiter (INVOISX_RATE_LIMIT_PER_MINUTE=0) all pass."""

    __slots__ = ("_client", "_limiter", "_per_minute")

    def __init__(self, limiter: RateLimiter | None, client: str, per_minute: int | None) -> None:
        self._limiter = limiter
        self._client = client
        self._per_minute = per_minute

    async def admit(self) -> float:
        """Wait for capacity for one attempt; the seconds waited (429 when none comes)."""
        if self._limiter is None:
            return 0.0
        return await self._limiter.acquire(self._client, self._per_minute)

    def learn(self, status: int, headers: Mapping[bytes, bytes]) -> None:
        """Tell the limiter what InvoisX answered (see `RateLimiter.learn`)."""
        if self._limiter is not None:
            self._limiter.learn(status, headers)

    def refund(self) -> None:
        """Give back what the last `admit` took: the call did not go to InvoisX after all."""
        if self._limiter is not None:
            self._limiter.refund(self._client)
