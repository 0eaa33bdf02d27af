"""Forwarding: one request to InvoisX with the server-held token, streamed both ways.

Only end-to-end headers cross the proxy. The client's credentials, cookies and routing
headers never reach InvoisX; cookies and hop-by-hop headers never come back.
Upstream failures are translated here, at one boundary, into 502 or 504.

The connections themselves are `proxy.upstream.http11`'s. Timeouts and the client-disconnect watch
are checked once a tick for every call in flight, rather than with timers set and cancelled
on every call (README, Performance).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from starlette.types import Receive, Scope, Send
from structlog.typing import FilteringBoundLogger

from proxy import __version__
from proxy.errors import BODY_INCOMPLETE, Decision, ProxyError, headers_too_large
from proxy.metrics import Metrics
from proxy.stages.policy import Permission
from proxy.stages.ratelimit import RateLimiter, header_number
from proxy.upstream.http11 import (
    Broken,
    Connection,
    Dropped,
    Origin,
    Pool,
    Stalled,
    Unreachable,
    UpstreamError,
)
from proxy.upstream.scrub import Scrub

__all__ = [
    "BodyIncomplete",
    "Capture",
    "ClientDisconnected",
    "Exchange",
    "Forwarder",
    "read_body",
    "request_headers",
    "response_headers",
]

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Credentials and routing information belong to the client's hop, never to InvoisX.
_NEVER_UPSTREAM = _HOP_BY_HOP | {
    b"authorization",
    b"cookie",
    b"forwarded",
    b"host",
    b"x-real-ip",
    b"x-proxy-key",
    b"x-request-id",
    b"expect",
    b"accept-encoding",
    # The proxy frames the body itself (see `_framing`).
    b"content-length",
    # A Laravel backend would run the named method instead of the one the policy checked.
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
    # httpoxy: a CGI-style backend reads this as its own outgoing proxy (HTTP_PROXY).
    b"proxy",
}
_NEVER_DOWNSTREAM = _HOP_BY_HOP | {b"set-cookie", b"x-request-id"}
_JSON = b"application/json"
_USER_AGENT = f"invoisx-proxy/{__version__}".encode()
# Seconds a call may run before the proxy starts listening for a client disconnect.
_WATCH_AFTER = 1.0
# nginx's convention for "client closed the connection before the response was complete".
_CLIENT_CLOSED = 499
# The response headers must be in within this many upstream timeouts of the request.
_HEADERS_WITHIN = 3
# InvoisX error bodies are small; this bounds what is kept to read their error_code.
_ERROR_PEEK_BYTES = 65_536
# Idle connections are closed before InvoisX's side is likely to close them.
_IDLE_TIMEOUT = 15.0
# What could split the request line: the parser in front refuses these, and so do we.
_UNSAFE_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")
# Sees each chunk of a request body before it is forwarded; raises `ProxyError` to refuse it.
Inspect = Callable[[bytes], None]
# The characters of a header name that may go upstream (names arrive lowercased).
_PLAIN = b"abcdefghijklmnopqrstuvwxyz0123456789-"
# Methods whose requests carry no body, so no `Content-Length: 0` either.
_NO_BODY_METHODS = frozenset({"GET", "HEAD"})


@dataclass(slots=True)
class Exchange:
    """One request's progress through the proxy: what the audit line reports."""

    request_id: str
    client: str
    route: str | None = None
    required: Permission | None = None
    status: int = 0
    decision: Decision = "forwarded"
    error_code: str | None = None
    upstream_ms: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    ratelimit_remaining: bytes | None = None
    waited_ms: float = 0.0
    retries: int = 0

    def client_gone(self) -> None:
        """Record that the client left early: not a server failure, so no error response."""
        self.status = self.status or _CLIENT_CLOSED
        self.decision = "upstream_error"
        self.error_code = "CLIENT_DISCONNECTED"

    def client_stalled(self) -> None:
        """Record that the client stopped reading the answer, which was then cut off."""
        self.decision = "upstream_error"
        self.error_code = "CLIENT_TIMEOUT"

    def body_cut_short(self) -> None:
        """Record that the client's connection closed before its request body was complete.
        Nobody is left to answer, but the call was the client's fault, not InvoisX's."""
        self.status = BODY_INCOMPLETE.status
        self.decision = BODY_INCOMPLETE.decision
        self.error_code = BODY_INCOMPLETE.error_code


class ClientDisconnected(Exception):
    """The client went away before the exchange finished."""


class BodyIncomplete(ClientDisconnected):
    """The client went away before the last byte of its request body."""


def _named_in_connection(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(token.strip().lower() for token in value.split(b","))
    return names


def _check_utf8(value: bytes) -> bytes:
    # InvoisX's stack reads header values as UTF-8; anything else could be read as another
    # value than the one the proxy checked, so it does not pass.
    if not value.isascii():
        try:
            value.decode()
        except UnicodeDecodeError:
            raise ProxyError(400, "BAD_REQUEST", "A header value is not valid UTF-8.") from None
    return value


def request_headers(
    headers: list[tuple[bytes, bytes]], authorization: bytes, has_body: bool, request_id: str
) -> list[tuple[bytes, bytes]]:
    """The headers to send upstream: the client's end-to-end ones plus the injected ones."""
    dropped = _NEVER_UPSTREAM | _named_in_connection(headers)
    kept: list[tuple[bytes, bytes]] = []
    present: set[bytes] = set()
    accept: bytes | None = None
    for raw_name, value in headers:
        name = raw_name.lower()
        # PHP reads '_' and '.' in a header name as it reads '-' (all become HTTP_X_...), so
        # X_Proxy_Key or X.HTTP.Method.Override would arrive as a header the rules drop; like
        # nginx by default, only letters, digits and '-' go upstream.
        if name in dropped or name.startswith(b"x-forwarded-") or name.translate(None, _PLAIN):
            continue
        if name == b"accept":
            accept = value
            continue
        present.add(name)
        kept.append((name, _check_utf8(value)))
    # InvoisX (Laravel) answers auth errors with redirects unless JSON is asked for.
    if accept is None or accept.strip() in (b"", b"*/*"):
        accept = _JSON
    kept.append((b"accept", _check_utf8(accept)))
    if has_body and b"content-type" not in present:
        kept.append((b"content-type", _JSON))
    # Never compressed: the token scrub (`proxy.upstream.scrub`) must be able to read every answer.
    kept.append((b"accept-encoding", b"identity"))
    if b"user-agent" not in present:
        kept.append((b"user-agent", _USER_AGENT))
    kept.append((b"x-request-id", request_id.encode()))
    kept.append((b"authorization", authorization))
    return kept


def response_headers(
    headers: list[tuple[bytes, bytes]], request_id: str
) -> list[tuple[bytes, bytes]]:
    """The upstream response headers that may be passed back, plus the proxy's request id."""
    dropped = _NEVER_DOWNSTREAM | _named_in_connection(headers)
    kept = [(name.lower(), value) for name, value in headers if name.lower() not in dropped]
    kept.append((b"x-request-id", request_id.encode()))
    return kept


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    values = {value.strip() for name, value in headers if name.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1 or not all(value.isdigit() for value in values):
        raise ProxyError(400, "BAD_REQUEST", "The Content-Length header is invalid.")
    return int(values.pop())


def _is_chunked(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"transfer-encoding" for name, _ in headers)


def _too_large(limit: int) -> ProxyError:
    return ProxyError(
        413,
        "PAYLOAD_TOO_LARGE",
        f"The request body is larger than {limit} bytes (INVOISX_PROXY_MAX_BODY_BYTES).",
    )


def _error_code(status: int, content_type: bytes, body: bytes) -> str | None:
    if status < 400 or b"json" not in content_type:
        return None
    try:
        code = json.loads(body).get("error_code")
    except (ValueError, AttributeError):
        return None
    # The code ends up in the audit line: keep only what looks like an InvoisX code.
    if isinstance(code, str) and len(code) <= 64 and code.replace("_", "").isalnum():
        return code
    return None


def _length_mismatch(received: int, declared: int) -> ProxyError:
    # Only a parser fault could cause this; InvoisX must never get a body other than the
    # client's, nor an Idempotency-Key keep an answer to one.
    return ProxyError(
        400,
        "BAD_REQUEST",
        f"The request body has {'more' if received > declared else 'fewer'} bytes than its "
        f"Content-Length ({declared}).",
    )


def _check_length(received: int, declared: int | None, last: bool) -> None:
    if declared is not None and (received > declared or (last and received != declared)):
        raise _length_mismatch(received, declared)


async def read_body(
    scope: Scope,
    receive: Receive,
    exchange: Exchange,
    *,
    limit: int,
    client_timeout: float,
    hold: Callable[[int], None],
) -> bytes:
    """The whole request body, for calls that must see it before forwarding (idempotency).

    `hold` is told of each chunk's bytes as they come and may refuse them; a client silent
    for `client_timeout` seconds gets 408.
    """
    declared = _content_length(scope["headers"])
    body = bytearray()
    while True:
        try:
            async with asyncio.timeout(client_timeout):
                message = await receive()
        except TimeoutError:
            raise _client_timeout(client_timeout, len(body), declared) from None
        if message["type"] == "http.disconnect":
            raise BodyIncomplete()
        chunk: bytes = message.get("body", b"")
        hold(len(chunk))
        body += chunk
        exchange.bytes_in = len(body)
        if len(body) > limit:
            raise _too_large(limit)
        last = not message.get("more_body", False)
        _check_length(len(body), declared, last)
        if last:
            return bytes(body)


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
        self.status = status
        self.headers = headers

    def add(self, chunk: bytes) -> None:
        if len(self.body) + len(chunk) > self.limit:
            self.truncated = True
        elif not self.truncated:
            self.body += chunk


class _Answer:
    """An answer's body on its way to the client: token masked, copied for `capture`, its
    start kept to read an error code (`peek`), counted; then handed out as ready chunks."""

    __slots__ = ("_capture", "_ready", "_scrub", "exchange", "last", "peek")

    def __init__(
        self, exchange: Exchange, scrub: Scrub, capture: Capture | None, *, peek: bool
    ) -> None:
        self.exchange = exchange
        self._scrub = scrub
        self._capture = capture
        self._ready: list[tuple[bytes, bool]] = []
        self.last = False  # the whole body has been handed in
        self.peek = bytearray() if peek else None

    def add(self, chunk: bytes, last: bool) -> int:
        """Take in body bytes from InvoisX; the number of token copies masked in them."""
        if not chunk and not last:
            return 0
        # Masked before anything else sees it: the idempotency copy, the error peek.
        chunk, masked = self._scrub.body(chunk, last)
        self.exchange.bytes_out += len(chunk)
        if self._capture is not None:
            self._capture.add(chunk)
        if self.peek is not None and len(self.peek) < _ERROR_PEEK_BYTES:
            self.peek += chunk
        if chunk or last:  # a chunk may go whole into the scrub's carry
            self._ready.append((chunk, last))
        self.last = last
        return masked

    def take_ready(self) -> list[tuple[bytes, bool]]:
        """The chunks taken in and not yet sent, with whether each is the last."""
        ready, self._ready = self._ready, []
        return ready


@dataclass(frozen=True, slots=True)
class _Upload:
    """A request body streamed from the client as it arrives, chunked when it came chunked
    (`declared` None), each chunk shown to `inspect` before it goes on."""

    receive: Receive
    declared: int | None
    inspect: Inspect | None


@dataclass(frozen=True, slots=True)
class _Request:
    """What each attempt at one call sends.

    Only a GET or HEAD without a body is retried (nothing else can be assumed harmless twice),
    and only when InvoisX answered 429 or 503, no connection could be opened, or a kept-alive
    connection closed before any byte of the answer.
    """

    method: str
    head: bytes  # request line and headers
    body: bytes | _Upload | None

    @property
    def retryable(self) -> bool:
        return self.method in _RETRYABLE_METHODS and self.body is None


_RETRYABLE_METHODS = frozenset({"GET", "HEAD"})
_RETRYABLE_STATUSES = frozenset({429, 503})


def _backoff(retries: int) -> float:
    return 0.25 * 2.0**retries


def _retry_delay(status: int, headers: Mapping[bytes, bytes], retries: int) -> float | None:
    """Seconds to wait before retrying a call InvoisX answered so, or None when it is final."""
    if status not in _RETRYABLE_STATUSES:
        return None
    retry_after = header_number(headers.get(b"retry-after"))
    return float(retry_after) if retry_after is not None else _backoff(retries)


def _unavailable(error: UpstreamError, *, note: str = "") -> ProxyError:
    # The upstream error's text says what happened (see `UpstreamError`).
    return ProxyError(502, "UPSTREAM_UNAVAILABLE", f"{error}{note}", decision="upstream_error")


def _client_timeout(seconds: float, received: int, declared: int | None) -> ProxyError:
    of = "" if declared is None else f" of {declared}"
    return ProxyError(
        408,
        "CLIENT_TIMEOUT",
        f"The request body stopped arriving: nothing for {seconds:g} s "
        f"(INVOISX_PROXY_CLIENT_TIMEOUT) after {received}{of} bytes, so InvoisX never got "
        "the whole request.",
        # The rest of the body may never come: the connection cannot carry another request.
        headers={"connection": "close"},
    )


def _timed_out(error: Stalled) -> ProxyError:
    return ProxyError(504, "UPSTREAM_TIMEOUT", str(error), decision="upstream_error")


def _upstream_failure(error: Broken | Stalled) -> ProxyError:
    return _timed_out(error) if isinstance(error, Stalled) else _unavailable(error)


# Why a POST, PUT, PATCH or DELETE whose kept-alive connection closed is not sent again.
_NOT_RESENT = " The call was not sent again: InvoisX may have read it before closing."


def _request_head(
    method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]]
) -> bytes:
    """The request line and headers, `host` first, ending with the blank line."""
    lines = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host]
    for name, value in headers:
        lines += (b"\r\n", name, b": ", value)
    lines.append(b"\r\n\r\n")
    return b"".join(lines)


def _chunk(data: bytes, last: bool) -> bytes:
    framed = b"%x\r\n%b\r\n" % (len(data), data) if data else b""
    return framed + b"0\r\n\r\n" if last else framed


class _Call:
    """A forwarded call in flight, as the forwarder's watch sees it once a tick.

    The watch gives up on InvoisX when it stays silent (or stops taking an upload) for the
    upstream timeout while the call waits for it, or when its headers are not all in within
    `_HEADERS_WITHIN` timeouts of the request. A call that has waited on its own client for the
    client timeout (a stalled upload, an answer not read) is cancelled, so its connection to
    InvoisX goes back to the pool. Once a call has run for `_WATCH_AFTER`, the watch listens
    for the client leaving,
    which cancels the call; a quick answer is over before a disconnect could save much work.
    Listening waits for the request body to be read: until then, `receive()` belongs to it.
    """

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
        "_started",
        "body_read",
        "client_left",
        "client_moves",
        "client_stalled",
        "connection",
        "sent_at",
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
    ) -> None:
        self._receive = receive
        self._owner = owner
        self._started = started
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
        if self._listen and self.body_read and now - self._started >= _WATCH_AFTER:
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
        # Once: `Forwarder.__call__` uncancels its task once for the watch's own cancel.
        if not self._cancelled:
            self._cancelled = True
            self._owner.cancel()


class Forwarder:
    """Sends requests below the upstream base URL over one pool of keep-alive connections.

    Use as an async context manager: the pool and the watch start on entry and stop on exit.
    """

    def __init__(
        self,
        *,
        base_url: str,
        max_body: int,
        timeout: float,
        max_header_bytes: int = 32_768,
        max_connections: int = 64,
        limiter: RateLimiter | None = None,
        retry_max: int = 0,
        client_timeout: float = 10.0,
        log: FilteringBoundLogger,
        metrics: Metrics,
    ) -> None:
        self._origin = Origin.from_url(base_url)
        self._log = log
        self._metrics = metrics
        self._max_body = max_body
        self._max_header_bytes = max_header_bytes
        self._limiter = limiter
        self._retry_max = retry_max
        self._client_timeout = client_timeout
        self._timeout = timeout
        # Fine enough for the shortest timeouts the tests use, coarse enough to cost nothing.
        self._tick = min(0.1, timeout / 4)
        self._calls: set[_Call] = set()
        self._pool = Pool(
            self._origin,
            limit=max_connections,
            connect_timeout=timeout,
            idle_timeout=_IDLE_TIMEOUT,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Forwarder:
        self._loop = asyncio.get_running_loop()
        self._pool.open(self._loop)
        self._watch_task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        self._pool.close()

    async def __call__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        exchange: Exchange,
        authorization: bytes,
        *,
        client_per_minute: int | None = None,
        preread: bytes | None = None,
        inspect: Inspect | None = None,
        capture: Capture | None = None,
        admitted: bool = False,
    ) -> None:
        """Forward one request to `path` below the base URL with the `authorization` header.

        `preread` is the request body when the caller already read it (`read_body`, after
        `check_request_size`); else `inspect` sees the body as it streams. `capture` keeps a
        copy of the response. `admitted`: the caller has called `admit` for the first attempt.
        Raises `ProxyError` when it fails before the response started.
        """
        loop = self._loop
        assert loop is not None, "use the Forwarder as an async context manager"
        if preread is None:  # a caller that read the body has checked the sizes already
            self.check_request_size(scope["headers"])
        request = self._request(
            scope, receive, path, authorization, exchange.request_id, preread, inspect
        )
        owner = asyncio.current_task(loop)
        assert owner is not None
        # A call whose answer is kept (idempotency) runs to the end even if its client leaves:
        # the answer is what the client's retry will get.
        call = _Call(
            receive,
            owner,
            loop.time(),
            listen=capture is None,
            body_read=not isinstance(request.body, _Upload),
        )
        self._calls.add(call)
        try:
            scrub = Scrub(authorization)
            await self._exchange(
                request, call, send, exchange, capture, client_per_minute, scrub, admitted
            )
        except (asyncio.CancelledError, ClientDisconnected) as gone:
            if not (call.client_left or call.client_stalled):
                raise
            if isinstance(gone, asyncio.CancelledError):
                # Our own watch cancelled us; nobody else asked this task to stop.
                owner.uncancel()
            if isinstance(gone, BodyIncomplete):
                exchange.body_cut_short()
            elif call.client_left:
                exchange.client_gone()
            elif exchange.status:
                exchange.client_stalled()  # the answer started: closing is all that is left
            else:
                upload = request.body
                declared = upload.declared if isinstance(upload, _Upload) else None
                raise _client_timeout(self._client_timeout, exchange.bytes_in, declared) from None
        finally:
            self._calls.discard(call)
            call.stop_listening()

    async def probe(self, authorization: bytes) -> tuple[int, str | None]:
        """One small read call to InvoisX: its status and error code (status 0: unreachable)."""
        origin = self._origin
        head = _request_head(
            b"GET",
            origin.base_path + b"/buyers?per_page=1",
            origin.host_header,
            [(b"accept", _JSON), (b"user-agent", _USER_AGENT), (b"authorization", authorization)],
        )
        try:
            connection = await self._pool.acquire(head_only=False)
        except Unreachable:
            return 0, None
        try:
            connection.send(head, last=True)
            async with asyncio.timeout(self._timeout):
                await connection.response_head()
                body = bytearray(connection.take())
                while not connection.complete and len(body) < _ERROR_PEEK_BYTES:
                    await connection.more()
                    body += connection.take()
            status, headers = connection.status, dict(connection.headers)
        except (Broken, Stalled, TimeoutError):
            return 0, None
        finally:
            self._pool.release(connection)
        return status, _error_code(status, headers.get(b"content-type", b""), bytes(body))

    def check_request_size(self, headers: list[tuple[bytes, bytes]]) -> None:
        """431 for headers over the limit, 413 for a declared body over it."""
        if sum(len(name) + len(value) + 4 for name, value in headers) > self._max_header_bytes:
            raise headers_too_large(self._max_header_bytes)
        length = _content_length(headers)
        if length is not None and length > self._max_body:
            raise _too_large(self._max_body)

    def _request(
        self,
        scope: Scope,
        receive: Receive,
        path: str,
        authorization: bytes,
        request_id: str,
        preread: bytes | None,
        inspect: Inspect | None,
    ) -> _Request:
        method: str = scope["method"]
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        target = self._origin.base_path + path.encode()
        if query := scope["query_string"]:
            target += b"?" + query
        if _UNSAFE_IN_TARGET.search(target):
            raise ProxyError(400, "BAD_REQUEST", "The request target is not allowed.")
        body: bytes | _Upload | None
        framing: list[tuple[bytes, bytes]]
        if preread is not None:
            body = preread or None
            framing = [(b"content-length", b"%d" % len(preread))]
        elif _is_chunked(headers):
            body = _Upload(receive, declared=None, inspect=inspect)
            framing = [(b"transfer-encoding", b"chunked")]
        else:
            length = _content_length(headers) or 0
            body = _Upload(receive, declared=length, inspect=inspect) if length else None
            framing = [(b"content-length", b"%d" % length)]
        if body is None and method in _NO_BODY_METHODS:
            framing = []
        outgoing = request_headers(headers, authorization, body is not None, request_id)
        head = _request_head(method.encode(), target, self._origin.host_header, outgoing + framing)
        return _Request(method, head, body)

    async def _watch(self) -> None:
        """Once a tick: check every call in flight, and let the pool expire what waited."""
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
            self._pool.expire(now)

    async def _exchange(
        self,
        request: _Request,
        call: _Call,
        send: Send,
        exchange: Exchange,
        capture: Capture | None,
        client_per_minute: int | None,
        scrub: Scrub,
        admitted: bool,
    ) -> None:
        started = time.perf_counter()
        connection = await self._send_with_retries(
            request, call, exchange, client_per_minute, started + self._timeout, admitted
        )
        exchange.upstream_ms = (time.perf_counter() - started) * 1000 - exchange.waited_ms
        try:
            await self._relay(connection, send, exchange, call, capture, scrub)
        finally:
            self._let_go(call, connection)

    async def _send_with_retries(
        self,
        request: _Request,
        call: _Call,
        exchange: Exchange,
        client_per_minute: int | None,
        deadline: float,
        admitted: bool,
    ) -> Connection:
        """Send, retrying only what cannot have taken effect twice (see `_Request`)."""
        retries_left = self._retry_max if request.retryable else 0
        fresh = False
        delay: float | None
        while True:
            if not admitted:
                await self.admit(exchange, client_per_minute)
            admitted = False
            try:
                connection = await self._attempt(request, call, exchange, fresh=fresh)
            except Unreachable as error:
                delay = _backoff(exchange.retries)
                if not retries_left or time.perf_counter() + delay >= deadline:
                    raise _unavailable(error) from error
            except Stalled as error:
                raise _timed_out(error) from error
            except Dropped as error:
                # A keep-alive race rather than a failure of InvoisX: a safe request goes again
                # at once, whatever INVOISX_RETRY_MAX says (once: a new connection is never
                # `Dropped`). An unsafe one does not: InvoisX may have read it before closing.
                if not request.retryable:
                    raise _unavailable(error, note=_NOT_RESENT) from error
                fresh = True
                exchange.retries += 1
                continue
            except Broken as error:
                raise _unavailable(error) from error
            else:
                try:
                    delay = self._learn(connection, exchange.retries)
                except BaseException:
                    self._let_go(call, connection)
                    raise
                if delay is None or not retries_left or time.perf_counter() + delay >= deadline:
                    return connection
                self._let_go(call, connection)  # the pool may hand it to another call meanwhile
            retries_left -= 1
            exchange.retries += 1
            await asyncio.sleep(delay)

    async def admit(self, exchange: Exchange, client_per_minute: int | None) -> None:
        """Wait until the rate limit lets one more call go to InvoisX (429 when it will not)."""
        if self._limiter is not None:
            waited = await self._limiter.acquire(exchange.client, client_per_minute)
            exchange.waited_ms += waited * 1000

    def refund(self, client: str) -> None:
        """Give back what `admit` took, for a call that did not go to InvoisX after all."""
        if self._limiter is not None:
            self._limiter.refund(client)

    def _let_go(self, call: _Call, connection: Connection) -> None:
        """Stop watching `connection` for `call`, then give it back to the pool."""
        call.use(None)
        self._pool.release(connection)

    def _learn(self, connection: Connection, retries: int) -> float | None:
        """Tell the limiter what InvoisX answered; the seconds before a retry, or None."""
        headers = dict(connection.headers)
        if self._limiter is not None:
            self._limiter.learn(connection.status, headers)
        return _retry_delay(connection.status, headers, retries)

    async def _attempt(
        self, request: _Request, call: _Call, exchange: Exchange, *, fresh: bool
    ) -> Connection:
        """Send the request on a connection (a new one if `fresh`), wait for the answer's head."""
        assert self._loop is not None
        connection = await self._pool.acquire(head_only=request.method == "HEAD", fresh=fresh)
        exchange.waited_ms += connection.waited * 1000
        call.use(connection)
        try:
            if isinstance(request.body, _Upload):
                connection.send(request.head, last=False)
                await self._upload(connection, request.body, call, exchange)
            else:
                connection.send(request.head + (request.body or b""), last=True)
            call.sent_at = self._loop.time()
            call.waiting = True
            await connection.response_head()
        except BaseException:
            self._let_go(call, connection)  # not reusable: the exchange did not end cleanly
            raise
        finally:
            call.waiting = False
        return connection

    async def _upload(
        self, connection: Connection, upload: _Upload, call: _Call, exchange: Exchange
    ) -> None:
        """Stream the client's body to InvoisX as it arrives, within the size limit."""
        while True:
            message = await upload.receive()
            if message["type"] == "http.disconnect":
                call.client_left = True
                raise BodyIncomplete()
            chunk: bytes = message.get("body", b"")
            call.client_moves += 1
            exchange.bytes_in += len(chunk)
            if exchange.bytes_in > self._max_body:
                raise _too_large(self._max_body)
            last = not message.get("more_body", False)
            # Checked before the chunk goes on: a refused body never reaches InvoisX whole.
            _check_length(exchange.bytes_in, upload.declared, last)
            if upload.inspect is not None:
                upload.inspect(chunk)
            chunked = upload.declared is None
            connection.send(_chunk(chunk, last) if chunked else chunk, last=last)
            if last:
                call.body_read = True
                return
            # Waiting for the client's next chunk is not InvoisX's doing: only this wait is.
            call.waiting = True
            await connection.drain()
            call.waiting = False
            if connection.head_in:
                return  # InvoisX answered before taking the whole upload

    def _scrubbed(self, exchange: Exchange, where: str, count: int, **detail: object) -> None:
        """Log and count the token kept out of an answer (never the token itself)."""
        self._log.warning("token_scrubbed", request_id=exchange.request_id, where=where, **detail)
        self._metrics.token_scrubbed(where, count)

    async def _relay(
        self,
        connection: Connection,
        send: Send,
        exchange: Exchange,
        call: _Call,
        capture: Capture | None,
        scrub: Scrub,
    ) -> None:
        status = connection.status
        exchange.status = status
        notable = dict(connection.headers)
        exchange.ratelimit_remaining = notable.get(b"x-ratelimit-remaining")
        headers, dropped = scrub.headers(response_headers(connection.headers, exchange.request_id))
        for name in dropped:
            self._scrubbed(exchange, "header", 1, header=name)
        if status in (204, 304):
            # They have no body, but uvicorn would wait for the one a Content-Length announces.
            headers = [header for header in headers if header[0] != b"content-length"]
        answer = _Answer(exchange, scrub, capture, peek=status >= 400)
        if capture is not None:
            capture.start(status, headers)
            # An answer to keep is read from InvoisX before the client sees any of it: a
            # client that then stalls holds no socket to InvoisX, and the answer is kept.
            while not answer.last and not capture.truncated:
                try:
                    await self._more(connection, call, answer)
                except (Broken, Stalled) as error:
                    # Nothing has gone to the client yet, so it gets the envelope.
                    raise _upstream_failure(error) from error
            capture.complete = answer.last
        await send({"type": "http.response.start", "status": status, "headers": headers})
        while True:
            for chunk, last in answer.take_ready():
                if last:
                    # Once the last chunk is out the server reports a disconnect; not ours.
                    call.stop_listening()
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                call.client_moves += 1
            if answer.last:
                break
            try:
                await self._more(connection, call, answer)
            except (Broken, Stalled) as error:
                # The status line is already out: closing the connection without the final
                # chunk is the only honest way left to tell the client the body is incomplete.
                exchange.decision = "upstream_error"
                exchange.error_code = (
                    "UPSTREAM_TIMEOUT" if isinstance(error, Stalled) else "UPSTREAM_UNAVAILABLE"
                )
                return
        if answer.peek is not None and b"content-encoding" not in notable:
            content_type = notable.get(b"content-type", b"")
            exchange.error_code = _error_code(status, content_type, bytes(answer.peek))

    async def _more(self, connection: Connection, call: _Call, answer: _Answer) -> None:
        """Hand the answer's next body bytes (or its end) from InvoisX to `answer`."""
        call.waiting = True
        try:
            await connection.more()
        finally:
            call.waiting = False
        masked = answer.add(connection.take(), connection.complete)
        if masked:
            self._scrubbed(answer.exchange, "body", masked, occurrences=masked)
