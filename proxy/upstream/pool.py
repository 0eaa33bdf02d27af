"""The pool of keep-alive connections to InvoisX, and the turns that bound them.

A call leases a connection for one exchange (`Pool.acquire`) and gives the lease back
(`Pool.release`) whatever happened; the pool keeps what it needs about each lease and each
idle connection on its own records, so a `Connection` knows only its exchange.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass

from proxy.upstream.errors import Unreachable, connect_failure
from proxy.upstream.http11 import Connection, Origin

__all__ = ["Lease", "Pool", "PoolStats"]


class Lease:
    """One exchange's hold on a connection and on one of the pool's turns."""

    __slots__ = ("connection", "holds_turn", "waited")

    def __init__(self, connection: Connection, waited: float) -> None:
        self.connection = connection
        self.waited = waited  # seconds the call waited for its turn
        self.holds_turn = True  # until `Pool.release`

    def __repr__(self) -> str:
        return f"<Lease {self.connection!r} waited={self.waited:.3f}s turn={self.holds_turn}>"


@dataclass(frozen=True, slots=True)
class PoolStats:
    """What the pool holds right now."""

    in_use: int  # turns held by exchanges (each with its socket)
    idle: int  # kept-alive connections waiting for the next exchange
    waiting: int  # calls waiting for a turn
    limit: int  # sockets at most, busy and idle together


class Pool:
    """Keep-alive connections to one origin: at most `limit` sockets, busy and idle together;
    idle connections are reused newest first.

    Each exchange holds a turn, one of the `limit`. A call that finds every turn taken waits: a
    freed turn goes to the longest waiting call, never to a newcomer, so no call is overtaken
    again and again. A turn is given back only when the exchange ends; the forward stage ends
    those held up by their own client (a slow upload, an answer read slowly) after the client
    timeout, so slow clients hold sockets for a bounded time. Bounding the exchanges in flight
    also keeps the proxy's per-call cost flatter under hundreds of concurrent clients
    (bench/README.md). The owner calls `expire` now and then: it closes connections idle too long
    and gives up for calls that waited too long.
    """

    def __init__(
        self, origin: Origin, *, limit: int, connect_timeout: float, idle_timeout: float
    ) -> None:
        self._origin = origin
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._ssl = ssl.create_default_context() if origin.tls else None
        self._loop: asyncio.AbstractEventLoop | None = None
        # (idle since, connection), the longest idle first.
        self._idle: deque[tuple[float, Connection]] = deque()
        self._in_use = 0
        # (deadline, turn), oldest first; all wait as long, so deadlines come in order too.
        self._waiters: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._closed = False

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start handing out connections on `loop`."""
        self._loop = loop

    def stats(self) -> PoolStats:
        """The turns in use, idle connections and waiting calls, for tests and monitoring."""
        idle = sum(connection.is_open for _, connection in self._idle)  # lost ones go at reuse
        waiting = sum(not turn.done() for _, turn in self._waiters)  # given up: cancelled
        return PoolStats(self._in_use, idle, waiting, self._limit)

    def __repr__(self) -> str:
        stats = self.stats()
        return (
            f"<Pool {self._origin.host}:{self._origin.port} in_use={stats.in_use}/{stats.limit}"
            f" idle={stats.idle} waiting={stats.waiting}>"
        )

    async def acquire(self, *, head_only: bool, fresh: bool = False) -> Lease:
        """A connection for one exchange, with a turn: idle or new (always new if `fresh`), once
        a turn is free within the connect timeout. Raises `Unreachable` when none is free in
        time or none opens."""
        waited = 0.0
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
        else:
            waited = await self._wait_turn()
        try:
            connection = None if fresh else self._idle_connection()
            if connection is None:
                if self._idle and self._in_use + len(self._idle) > self._limit:
                    self._idle.popleft()[1].close()  # room for the new socket
                connection = await self._connect()
        except BaseException:
            self._hand_on()
            raise
        connection.begin(head_only=head_only)
        return Lease(connection, waited)

    def release(self, lease: Lease) -> None:
        """End the exchange: keep the connection for the next one when it ended cleanly, else
        close it. Every lease must come back here, whatever happened."""
        connection = lease.connection
        if connection.reusable and not self._closed:
            connection.park()
            assert self._loop is not None  # the lease came from `acquire`
            self._idle.append((self._loop.time(), connection))
        elif connection.complete:
            connection.close()
        else:
            connection.abort()  # InvoisX must not take a half-sent request for a whole one
        # After the close: asyncio closes the socket a callback later, before the next call
        # this turn wakes can open one, so the sockets never exceed the limit.
        if lease.holds_turn:
            lease.holds_turn = False
            self._hand_on()

    def expire(self, now: float) -> None:
        """Close connections idle too long (InvoisX may close them first, mid-request) and
        fail the calls that have waited the connect timeout for a connection."""
        while self._idle and now - self._idle[0][0] > self._idle_timeout:
            self._idle.popleft()[1].close()
        while self._waiters and self._waiters[0][0] <= now:
            _, turn = self._waiters.popleft()
            if not turn.done():
                turn.set_exception(
                    Unreachable(
                        f"No connection to InvoisX came free within {self._connect_timeout:g} s: "
                        f"all {self._limit} (INVOISX_PROXY_MAX_UPSTREAM_CONNECTIONS) stayed busy."
                    )
                )

    async def _wait_turn(self) -> float:
        """Wait for a freed turn; the seconds waited."""
        assert self._loop is not None, "open the pool first"
        turn = self._loop.create_future()
        started = self._loop.time()
        self._waiters.append((started + self._connect_timeout, turn))
        try:
            await turn
        except BaseException:
            if not turn.done():
                turn.cancel()  # skipped when its turn would come
            elif not turn.cancelled() and turn.exception() is None:
                self._hand_on()  # the turn came as the call gave up: pass it on
            raise
        return self._loop.time() - started

    def _hand_on(self) -> None:
        """Give a freed turn to the longest waiting call, or count it free."""
        while self._waiters:
            _, turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._in_use -= 1

    def _idle_connection(self) -> Connection | None:
        while self._idle:
            _, connection = self._idle.pop()
            if connection.is_open:
                return connection
        return None

    def close(self) -> None:
        """Close every idle connection; busy ones close when released."""
        self._closed = True
        while self._idle:
            self._idle.pop()[1].close()

    async def _connect(self) -> Connection:
        loop = self._loop
        assert loop is not None, "open the pool first"
        origin = self._origin
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: Connection(loop, tls=origin.tls),
                    origin.host,
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=origin.host if self._ssl else None,
                )
        except TimeoutError as error:  # before OSError, of which it is one
            raise Unreachable(
                f"InvoisX could not be reached: no connection within {self._connect_timeout:g} s "
                "(INVOISX_PROXY_UPSTREAM_TIMEOUT)."
            ) from error
        except OSError as error:  # ssl.SSLError is an OSError too
            raise Unreachable(connect_failure(error)) from error
        return connection
