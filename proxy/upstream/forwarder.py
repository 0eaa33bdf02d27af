"""Forwarding: one vetted call to InvoisX with the server-held token, streamed both ways.

The forwarder frames the request (`headers` decides what crosses), sends it on a pooled
connection (`pool`, `http11`) and retries only what cannot have taken effect twice; the
answer goes back through `relay`; `deadlines` times every call. Upstream failures become
502 or 504 at one boundary (`errors.failure`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping

from starlette.types import Receive, Send
from structlog.typing import FilteringBoundLogger

from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.stages.idempotency import Capture
from proxy.stages.ratelimit import Admission, header_number
from proxy.upstream.deadlines import CallWatch, Deadlines, Watching
from proxy.upstream.errors import Broken, Dropped, Stalled, Unreachable, failure
from proxy.upstream.headers import request_headers
from proxy.upstream.http11 import Origin, chunk, request_head
from proxy.upstream.pool import Lease, Pool
from proxy.upstream.relay import ERROR_PEEK_BYTES, Relay, error_code
from proxy.upstream.request import Request, Upload, frame
from proxy.upstream.scrub import Scrub

__all__ = ["Forwarder"]

# Idle connections are closed before InvoisX's side is likely to close them.
_IDLE_TIMEOUT = 15.0
_RETRYABLE_STATUSES = frozenset({429, 503})
# Why a POST, PUT, PATCH or DELETE whose kept-alive connection closed is not sent again.
_NOT_RESENT = " The call was not sent again: InvoisX may have read it before closing."


def _backoff(retries: int) -> float:
    return 0.25 * 2.0**retries


def _retry_delay(status: int, headers: Mapping[bytes, bytes], retries: int) -> float | None:
    """Seconds to wait before retrying a call InvoisX answered so, or None when it is final."""
    if status not in _RETRYABLE_STATUSES:
        return None
    retry_after = header_number(headers.get(b"retry-after"))
    return float(retry_after) if retry_after is not None else _backoff(retries)


class Forwarder:
    """Sends requests below the upstream base URL over one pool of keep-alive connections.

    Use as an async context manager: the pool and the deadlines start on entry, stop on exit.
    """

    def __init__(
        self,
        *,
        base_url: str,
        timeout: float,
        max_connections: int = 64,
        retry_max: int = 0,
        client_timeout: float = 10.0,
        log: FilteringBoundLogger,
        metrics: Metrics,
    ) -> None:
        self._origin = Origin.from_url(base_url)
        self._retry_max = retry_max
        self._client_timeout = client_timeout
        self._timeout = timeout
        self._pool = Pool(
            self._origin,
            limit=max_connections,
            connect_timeout=timeout,
            idle_timeout=_IDLE_TIMEOUT,
        )
        self._deadlines = Deadlines(
            timeout=timeout, client_timeout=client_timeout, expire=self._pool.expire, log=log
        )
        self._relay = Relay(log=log, metrics=metrics)
        # Frames a call to this origin (`request.frame` without its first argument).
        self.request = functools.partial(frame, self._origin)

    async def __aenter__(self) -> Forwarder:
        self._pool.open(asyncio.get_running_loop())
        await self._deadlines.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._deadlines.__aexit__(*exc_info)
        self._pool.close()

    def watch(
        self, receive: Receive, exchange: Exchange, request: Request, *, keep_answer: bool
    ) -> Watching:
        """The call's deadlines and client watch, from the first rate-limit wait to the end of
        the answer; a call whose answer is kept (idempotency) runs on if its client leaves,
        since the answer is what the client's retry will get."""
        upload = request.body if isinstance(request.body, Upload) else None
        declared = upload.body.declared if upload else None
        return Watching(
            self._deadlines, receive, exchange, not keep_answer, declared, upload is None
        )

    async def __call__(
        self,
        request: Request,
        call: CallWatch,
        send: Send,
        exchange: Exchange,
        admission: Admission,
        capture: Capture | None = None,
    ) -> None:
        """Send `request` (its first attempt admitted within `call`'s watch), relay the
        answer; `capture` keeps a copy of it. Raises `ProxyError` when it fails before the
        answer started."""
        # A call whose answer is kept (Idempotency-Key) goes on a new connection: on a reused
        # one, InvoisX closing it while idle would leave the call's outcome unknown.
        fresh = capture is not None
        lease = await self._send_with_retries(request, call, exchange, admission, fresh=fresh)
        # Waits for the rate limit or a connection are not InvoisX's.
        elapsed = (time.perf_counter() - call.started) * 1000
        exchange.upstream_ms = elapsed - (exchange.waited_ms - call.waited_before)
        try:
            scrub = Scrub(request.authorization)
            await self._relay(lease.connection, send, exchange, call, capture, scrub)
        finally:
            self._let_go(call, lease)

    async def _send_with_retries(
        self,
        request: Request,
        call: CallWatch,
        exchange: Exchange,
        admission: Admission,
        *,
        fresh: bool,
    ) -> Lease:
        """Send (on a new connection if `fresh`), retrying only what cannot have taken effect
        twice (see `Request`); each attempt after the first is admitted by the rate limit
        again. Retries end with the upstream timeout, counted from the call's first wait."""
        deadline = call.started + self._timeout
        retries_left = self._retry_max if request.retryable else 0
        delay: float | None
        while True:
            try:
                lease = await self._attempt(request, call, exchange, fresh=fresh)
            except Unreachable as error:
                delay = _backoff(exchange.retries)
                if not retries_left or time.perf_counter() + delay >= deadline:
                    raise failure(error) from error
            except Dropped as error:
                # A keep-alive race rather than a failure of InvoisX: a safe request goes again
                # at once, whatever INVOISX_RETRY_MAX says (once: a new connection is never
                # `Dropped`). An unsafe one does not: InvoisX may have read it before closing.
                if not request.retryable:
                    raise failure(error, note=_NOT_RESENT) from error
                fresh = True
                exchange.retries += 1
                exchange.waited_ms += await admission.admit() * 1000
                continue
            except (Broken, Stalled) as error:
                raise failure(error) from error
            else:
                try:
                    delay = await self._learn(lease, admission, exchange)
                except BaseException:
                    self._let_go(call, lease)
                    raise
                if delay is None or not retries_left or time.perf_counter() + delay >= deadline:
                    return lease
                self._let_go(call, lease)  # the pool may hand it to another call meanwhile
            retries_left -= 1
            exchange.retries += 1
            await asyncio.sleep(delay)
            exchange.waited_ms += await admission.admit() * 1000

    async def _learn(self, lease: Lease, admission: Admission, exchange: Exchange) -> float | None:
        """Tell the rate limit what InvoisX answered; the seconds before a retry, or None."""
        connection = lease.connection
        headers = dict(connection.headers)
        exchange.throttled += connection.status == 429
        await admission.learn(connection.status, headers)
        return _retry_delay(connection.status, headers, exchange.retries)

    def _let_go(self, call: CallWatch, lease: Lease) -> None:
        """Stop watching the lease's connection for `call`, then give it back to the pool."""
        call.use(None)
        self._pool.release(lease)

    async def _attempt(
        self, request: Request, call: CallWatch, exchange: Exchange, *, fresh: bool
    ) -> Lease:
        """Send the request on a connection (a new one if `fresh`), wait for the answer's head."""
        lease = await self._pool.acquire(head_only=request.method == "HEAD", fresh=fresh)
        exchange.waited_ms += lease.waited * 1000
        connection = lease.connection
        call.use(connection)
        exchange.sent = True  # from here on InvoisX may get the request, or part of it
        try:
            if isinstance(request.body, Upload):
                connection.send(request.head, last=False)
                await self._upload(lease, request.body, call)
            else:
                connection.send(request.head + (request.body or b""), last=True)
            call.sent_at = self._deadlines.now()
            call.waiting = True
            await connection.response_head()
        except BaseException:
            self._let_go(call, lease)  # not reusable: the exchange did not end cleanly
            raise
        finally:
            call.waiting = False
        return lease

    async def _upload(self, lease: Lease, upload: Upload, call: CallWatch) -> None:
        """Stream the client's body to InvoisX as it arrives, within the limits."""
        connection = lease.connection
        chunked = upload.body.declared is None
        while True:
            data, last = await upload.body.next()
            call.client_moves += 1
            if upload.inspect is not None:
                upload.inspect(data)
            connection.send(chunk(data, last) if chunked else data, last=last)
            if last:
                call.body_read = True
                return
            # Waiting for the client's next chunk is not InvoisX's doing: only this wait is.
            call.waiting = True
            await connection.drain()
            call.waiting = False
            if connection.head_in:
                return  # InvoisX answered before taking the whole upload

    async def probe(self, authorization: bytes, request_id: str) -> tuple[int, str | None]:
        """One small read call to InvoisX: its status and error code (status 0: unreachable).
        Its headers are the ones any GET gets (`headers.request_headers`)."""
        origin = self._origin
        head = request_head(
            b"GET",
            origin.base_path + b"/buyers?per_page=1",
            origin.host_header,
            request_headers([], authorization, False, request_id),
        )
        try:
            lease = await self._pool.acquire(head_only=False)
        except Unreachable:
            return 0, None
        connection = lease.connection
        try:
            connection.send(head, last=True)
            async with asyncio.timeout(self._timeout):
                await connection.response_head()
                body = bytearray(connection.take())
                while not connection.complete and len(body) < ERROR_PEEK_BYTES:
                    await connection.more()
                    body += connection.take()
            status, headers = connection.status, dict(connection.headers)
        except (Broken, Stalled, TimeoutError):
            return 0, None
        finally:
            self._pool.release(lease)
        return status, error_code(status, headers.get(b"content-type", b""), bytes(body))
