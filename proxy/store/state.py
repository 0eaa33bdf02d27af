"""The shared state store (Redis): one client, short timeouts, and a breaker.

Every command has INVOISX_PROXY_REDIS_TIMEOUT in all (tens of milliseconds: a proxy must not
wait on Redis longer than on the call it admits). A refused or broken connection opens the
breaker at once; timeouts open it only when several came and nothing succeeded for a second,
since a few alone are as often a busy event loop (a burst of calls) as a Redis in trouble.
While it is open, callers use their local fallback at once, without trying Redis, until a
heartbeat (`probe`) gets an answer again. A Redis problem thus costs a call at most a few
timeouts, and never takes the proxy out of service.

redis-py closes a connection whose command was cancelled (by the timeout, or a client that
left), so a late answer is never read as the next command's (tests/store/test_state.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from structlog.typing import FilteringBoundLogger

from proxy.metrics import Metrics

__all__ = ["StateStore", "redis_client"]

# A heartbeat may take longer than a command: it is also how a new connection gets made.
_PROBE_TIMEOUT = 1.0
_WATCH_INTERVAL = 1.0
_TIMEOUTS_TO_OPEN = 3
_SILENCE_TO_OPEN = 1.0  # seconds without a success, with timeouts, before the breaker opens
_CONNECTIONS = 8
_REASON_CHARS = 200


def redis_client(url: str, timeout: float) -> Redis:
    """A client for `url` that fails fast: no retries, `timeout` for connect and reply.
    Raises ValueError for a URL redis-py cannot use."""
    # A few connections, that concurrent calls wait for: a burst of calls that each opened
    # one would spend the timeout connecting.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=_CONNECTIONS,
        timeout=None,  # bounded by each command's own timeout
        socket_timeout=max(timeout, _PROBE_TIMEOUT),
        socket_connect_timeout=max(timeout, _PROBE_TIMEOUT),
        retry=Retry(NoBackoff(), 0),
        client_name="invoisx-proxy",
    )
    return Redis.from_pool(pool)


class StateStore:
    """Redis and whether it is answering; logs and counts each change."""

    def __init__(
        self, redis: Redis, *, timeout: float, log: FilteringBoundLogger, metrics: Metrics
    ) -> None:
        self._redis = redis
        self._timeout = timeout
        self._log = log
        self._metrics = metrics
        self.up = True
        self._down_since = 0.0
        self._timeouts = 0  # since the last success
        self._succeeded_at = time.monotonic()
        metrics.state_store_up(True)

    def script(self, source: str) -> AsyncScript:
        """A Lua script run by its SHA (EVALSHA), loaded once when Redis does not know it."""
        return self._redis.register_script(source)

    async def run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """The script's reply; None when the breaker is open or Redis failed just now (the
        breaker may still be closed after one timeout: `up` tells)."""
        if not self.up:
            return None
        return await self._attempt(script, keys, args, self._timeout)

    async def probe(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Run the script even while the breaker is open (heartbeats); None on failure. The
        caller closes the breaker (`recovered`) once it has done what recovery needs."""
        return await self._attempt(script, keys, args, max(self._timeout, _PROBE_TIMEOUT))

    def recovered(self) -> None:
        """Close the breaker: Redis answers again."""
        if self.up:
            return
        self.up = True
        self._metrics.state_store_up(True)
        self._log.info(
            "state_store_recovered", down_seconds=round(time.monotonic() - self._down_since, 3)
        )

    def describe(self) -> dict[str, object]:
        """For `/readyz`: whether Redis answers."""
        return {"kind": "redis", "up": self.up}

    async def watch(self) -> None:
        """Try Redis again every second while the breaker is open, until cancelled (the
        heartbeat of a proxy that keeps only its Idempotency-Keys there)."""
        while True:
            await asyncio.sleep(_WATCH_INTERVAL)
            if self.up:
                continue
            await self.reconnect()
            try:
                async with asyncio.timeout(_PROBE_TIMEOUT):
                    await self._redis.ping()
            except (TimeoutError, RedisError, OSError):
                continue
            self.recovered()

    async def reconnect(self) -> None:
        """Drop every connection, so the next command makes a new one."""
        await self._redis.connection_pool.disconnect()

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self._redis.aclose()

    async def _attempt(
        self, script: AsyncScript, keys: list[str], args: list[Any], timeout: float
    ) -> Any:
        try:
            async with asyncio.timeout(timeout):
                reply = await script(keys, args)
        except (TimeoutError, RedisTimeoutError) as error:
            self._timeouts += 1
            silent = time.monotonic() - self._succeeded_at
            if self._timeouts >= _TIMEOUTS_TO_OPEN and silent >= _SILENCE_TO_OPEN:
                self._went_down(error)
            return None
        except (RedisError, OSError) as error:
            self._went_down(error)
            return None
        self._timeouts = 0
        self._succeeded_at = time.monotonic()
        return reply

    def _went_down(self, error: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self._down_since = time.monotonic()
        self._metrics.state_store_up(False)
        reason = str(error) or f"no answer within {self._timeout} s"
        reason = f"{type(error).__name__}: {reason}"[:_REASON_CHARS]
        self._log.warning(
            "state_store_unavailable",
            reason=reason,
            fallback="until Redis answers, each proxy admits its share of the budget and "
            "calls with an Idempotency-Key get 503",
        )
