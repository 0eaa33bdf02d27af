"""Deadlines: every forwarded call's timeouts and its client-disconnect watch, checked once a
tick for all calls in flight, rather than with timers set and cancelled on every call
(bench/README.md). The same tick lets the pool expire idle connections and waiting calls.

A call gives up on InvoisX when it stays silent (or stops taking an upload) for the upstream
timeout while the call waits for it, or when its headers are not all in within
`_HEADERS_WITHIN` timeouts of the request. A call that has waited on its own client for the
client timeout (a stalled upload, an answer not read) is cancelled, so its connection to
InvoisX goes back to the pool. Once a call has run for `_WATCH_AFTER`, the watch listens for
the client leaving, which cancels the call; a quick answer is over before a disconnect could
save much work. Listening waits for the request body to be read: until then, `receive()`
belongs to it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.types import Receive
from structlog.typing import FilteringBoundLogger

from proxy import errors
from proxy.exchange import Exchange
from proxy.upstream.http11 import Connection

__all__ = ["CallWatch", "Deadlines", "Watching"]

# Seconds a call may run before the proxy starts listening for a client disconnect.
_WATCH_AFTER = 1.0
# The response headers must be in within this many upstream timeouts of the request.
_HEADERS_WITHIN = 3


class CallWatch:
    """A forwarded call in flight, as the watch sees it once a tick."""

    __slots__ = (
        "_cancelled",
        "_client_seen",
        "_client_since",
        "_listen",
        "_listener",
        "_owner",
        "_quiet_since",
        "_receive",
        "_seen",
        "_since",
        "body_read",
        "client_left",
        "client_moves",
        "client_stalled",
        "connection",
        "sent_at",
        "started",
        "waited_before",
        "waiting",
    )

    def __init__(
        self,
        receive: Receive,
        owner: asyncio.Task[None],
        started: float,
        *,
        listen: bool,
        body_read: bool,
        waited_before: float,
    ) -> None:
        self._receive = receive
        self._owner = owner
        self._since = started
        # When the call started (`time.perf_counter`), and what it had waited before: its
        # retries' deadline and its upstream time are measured from here.
        self.started = time.perf_counter()
        self.waited_before = waited_before
        self._listen = listen
        self._listener: asyncio.Task[None] | None = None
        self._seen = -1
        self._quiet_since = started
        self._client_since: float | None = None
        # Chunks received from or sent to the client: a stall is a stretch without one.
        self.client_moves = 0
        self._client_seen = 0
        self._cancelled = False
        self.connection: Connection | None = None
        self.waiting = False  # for InvoisX: its answer, or room for more of the upload
        self.sent_at: float | None = None
        self.body_read = body_read
        self.client_left = False
        self.client_stalled = False

    def use(self, connection: Connection | None) -> None:
        """The connection the call's current attempt uses (None between attempts)."""
        self.connection = connection
        self.sent_at = None
        self._seen = -1  # a new connection's silence is counted from now
        self._client_since = None

    def check(self, now: float, timeout: float, client_timeout: float) -> None:
        """One tick of the watch."""
        connection = self.connection
        if connection is not None:
            if not self.waiting or connection.progress != self._seen:
                self._seen = connection.progress
                self._quiet_since = now
            elif now - self._quiet_since >= timeout:
                connection.time_out(timeout)
            if self.waiting:
                self._client_since = None
            elif self._client_since is None or self.client_moves != self._client_seen:
                self._client_since, self._client_seen = now, self.client_moves
            elif now - self._client_since >= client_timeout and not self.client_stalled:
                self.client_stalled = True
                self._cancel()
            # A silent InvoisX is caught above; this one would trickle its headers forever.
            sent_at = self.sent_at
            overdue = sent_at is not None and now - sent_at >= _HEADERS_WITHIN * timeout
            if overdue and not connection.head_in:
                connection.headers_overdue(_HEADERS_WITHIN * timeout)
        if self._listen and self.body_read and now - self._since >= _WATCH_AFTER:
            self._listen = False
            self._listener = asyncio.create_task(self._watch_client())

    def stop_listening(self) -> None:
        """No more listening: the response is complete, or the call is over."""
        self._listen = False
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None

    async def _watch_client(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.client_left = True
        self._cancel()

    def _cancel(self) -> None:
        # Once: the forwarder uncancels its task once for the watch's own cancel.
        if not self._cancelled:
            self._cancelled = True
            self._owner.cancel()


class Deadlines:
    """The calls in flight and the task that checks them once a tick; use as an async
    context manager. `expire` (the pool's) runs on the same tick."""

    def __init__(
        self,
        *,
        timeout: float,
        client_timeout: float,
        expire: Callable[[float], None],
        log: FilteringBoundLogger,
    ) -> None:
        self._timeout = timeout
        self._client_timeout = client_timeout
        self._expire = expire
        self._log = log
        # Fine enough for the shortest timeouts the tests use, coarse enough to cost nothing.
        self._tick = min(0.1, timeout / 4)
        self._calls: set[CallWatch] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Deadlines:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def now(self) -> float:
        """The loop's clock, which the deadlines are measured on."""
        assert self._loop is not None, "enter the deadlines first"
        return self._loop.time()

    def add(self, call: CallWatch) -> None:
        """Check `call` on every tick from now on."""
        self._calls.add(call)

    def forget(self, call: CallWatch) -> None:
        """Stop watching `call`: it is over."""
        self._calls.discard(call)
        call.stop_listening()

    @property
    def client_timeout(self) -> float:
        """Seconds a call may wait on its own client (INVOISX_PROXY_CLIENT_TIMEOUT)."""
        return self._client_timeout

    async def _run(self) -> None:
        assert self._loop is not None
        while True:
            await asyncio.sleep(self._tick)
            now = self._loop.time()
            for call in list(self._calls):
                try:
                    call.check(now, self._timeout, self._client_timeout)
                except Exception:
                    # A bug, but the watch must go on: it is every call's timeout.
                    self._log.exception("internal_error", stage="forward watch")
            self._expire(now)


class Watching:
    """One call's watch, as an async context manager: when the watch cancels the call (its
    client left, or stalled), the outcome is recorded on the exchange instead of the
    cancellation going on; a stalled upload before any answer gets 408."""

    __slots__ = (
        "_body_read",
        "_call",
        "_deadlines",
        "_declared",
        "_exchange",
        "_listen",
        "_receive",
    )

    def __init__(
        self,
        deadlines: Deadlines,
        receive: Receive,
        exchange: Exchange,
        listen: bool,
        declared: int | None,
        body_read: bool,
    ) -> None:
        self._deadlines = deadlines
        self._receive = receive
        self._exchange = exchange
        self._listen = listen
        self._declared = declared
        self._body_read = body_read
        self._call: CallWatch | None = None

    async def __aenter__(self) -> CallWatch:
        owner = asyncio.current_task()
        assert owner is not None
        call = CallWatch(
            self._receive,
            owner,
            self._deadlines.now(),
            listen=self._listen,
            body_read=self._body_read,
            waited_before=self._exchange.waited_ms,
        )
        self._deadlines.add(call)
        self._call = call
        return call

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: object
    ) -> bool:
        call = self._call
        assert call is not None
        self._deadlines.forget(call)
        if kind is not asyncio.CancelledError or not (call.client_left or call.client_stalled):
            return False
        # Our own watch cancelled us; nobody else asked this task to stop.
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        exchange = self._exchange
        if call.client_left:
            exchange.client_gone()
        elif exchange.status:
            exchange.client_stalled()  # the answer started: closing is all that is left
        else:
            timeout = self._deadlines.client_timeout
            raise errors.body_stalled(timeout, exchange.bytes_in, self._declared) from None
        return True
