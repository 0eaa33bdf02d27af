"""Connections to InvoisX: HTTP/1.1 on asyncio transports, answers parsed by httptools.

The forward stage needs little of an HTTP client: one origin, requests it has already vetted
and framed, bodies passed through as bytes. A general client (aiohttp) spent as much CPU per
call as all the proxy's other stages together (README, Performance), so this module does that
little itself: httptools (llhttp, the parser uvicorn uses for requests) reads the answers, and
a stack of idle keep-alive connections saves the connect. No proxy variables or .netrc are
read, no cookies kept, and TLS certificates are always verified.

A connection serves one exchange at a time: `Pool.acquire`, `Connection.send` the request,
await `Connection.response_head`, then `Connection.take` body bytes until `complete` (awaiting
`Connection.more` in between), and `Pool.release`. Timeouts are the caller's: it watches
`progress` and calls `Connection.time_out`, so a call costs no timer of its own here.

A connection kept alive is reused only after an exchange that ended cleanly. Bytes that come
with an answer but beyond it are caught; bytes an upstream sends later, after the answer
looked complete, cannot be told apart from its next answer: a limit of HTTP/1.1 keep-alive.
A reused connection that closes before any byte of its answer fails with `Dropped`: InvoisX
may have closed it while it sat idle, so the caller may send a safe request again.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = [
    "Broken",
    "Connection",
    "Dropped",
    "Origin",
    "Pool",
    "Stalled",
    "Unreachable",
    "UpstreamError",
    "connect_failure",
]

# Response bytes held for a client that reads slower than InvoisX sends, before reading pauses.
_HIGH_WATER = 262_144
# The parser sets no limit on response headers; InvoisX's are a few hundred bytes. Counted
# header by header, and as bytes received while the head is incomplete: the parser grows an
# unfinished header value without bound, at quadratic cost. The same bounds the bytes in a
# row after the head that carry no body (chunk framing, trailers), which grow alike.
_MAX_HEADER_BYTES = 65_536
_DEFAULT_PORTS = {"http": 80, "https": 443}


class UpstreamError(Exception):
    """The exchange with InvoisX failed; the forward stage turns this into 502 or 504.

    Its text is one sentence for the client saying what went wrong. It names neither
    InvoisX's address nor anything InvoisX sent, which could carry the token.
    """


class Unreachable(UpstreamError):
    """No connection (refused, unresolvable, TLS refused, too slow): nothing was sent."""


class Broken(UpstreamError):
    """The connection failed after the request went out: closed, reset, or not HTTP."""


class Dropped(Broken):
    """A reused connection closed before any byte of the answer: InvoisX may have closed it
    while idle, before or after reading the request (a keep-alive race)."""


class Stalled(UpstreamError):
    """InvoisX stopped answering or stopped taking the upload (see `Connection.time_out`)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where InvoisX is, split once from INVOISX_API_URL."""

    host: str
    port: int
    tls: bool
    host_header: bytes  # as the URL names it, the default port left out
    base_path: bytes  # the path every request target goes below, e.g. b"/api/v1"

    @classmethod
    def from_url(cls, url: str) -> Origin:
        """Split an absolute http(s) URL (validated by the settings)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
        named = f"[{host}]" if ":" in host else host
        if port != _DEFAULT_PORTS[parts.scheme]:
            named += f":{port}"
        return cls(host, port, parts.scheme == "https", named.encode("idna"), parts.path.encode())


class Connection(asyncio.Protocol):
    """One keep-alive connection and the state of the exchange it is serving."""

    __slots__ = (
        "_answered_early",
        "_buffered",
        "_busy",
        "_chunks",
        "_coding",
        "_eof",
        "_error",
        "_framing_bytes",
        "_head_bytes",
        "_head_only",
        "_header_bytes",
        "_interim",
        "_keep_alive",
        "_loop",
        "_parser",
        "_read_paused",
        "_reused",
        "_sent",
        "_tainted",
        "_tls",
        "_transport",
        "_waiter",
        "_write_paused",
        "complete",
        "head_in",
        "headers",
        "holds_turn",
        "idle_since",
        "progress",
        "status",
        "waited",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, *, tls: bool) -> None:
        self._loop = loop
        self._tls = tls
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._write_paused = False
        self._read_paused = False
        self._busy = False
        self._eof = False
        # Set by a failure, or by anything after the answer (a second response, garbage, a
        # body to a HEAD): the stream can no longer be trusted to start where the next
        # exchange expects, so later parser callbacks are ignored and it is never reused.
        self._tainted = False
        self._interim = False
        self._reused = False
        # Bytes received and upload room regained: what a caller watches to tell a stall.
        self.progress = 0
        self.idle_since = 0.0
        # Whether this exchange still holds one of the pool's turns (until `Pool.release`), and
        # the seconds it waited for its turn.
        self.holds_turn = False
        self.waited = 0.0
        self._clear_exchange(head_only=False)

    # --- the exchange, as the forward stage drives it -------------------------------------

    def begin(self, *, head_only: bool) -> None:
        """Start an exchange; `head_only` for HEAD, whose answer has no body."""
        self._busy = True
        self._clear_exchange(head_only=head_only)

    def send(self, data: bytes, *, last: bool) -> None:
        """Write request bytes; `last` marks the request as complete."""
        assert self._transport is not None
        self._sent = last
        self._transport.write(data)

    async def drain(self) -> None:
        """Wait until InvoisX takes more of the upload, or has already answered; raise when
        the connection is gone, since the rest of the upload is moot then."""
        while self._write_paused and not self.head_in:
            await self._wait()
        if self.head_in:
            return
        if self._error is not None:
            raise self._error
        if not self.is_open:
            # A failed write closes the transport at once; connection_lost comes a turn later.
            raise Broken("The connection to InvoisX broke while the request body was being sent.")

    async def response_head(self) -> None:
        """Wait for the answer's status line and headers (`status`, `headers`)."""
        while not self.head_in:
            await self._wait()

    async def more(self) -> None:
        """Wait until more body bytes or the end of the answer arrive."""
        while not self._chunks and not self.complete:
            await self._wait()

    def take(self) -> bytes:
        """The body bytes received and not yet taken."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._read_paused and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()
        return data

    def time_out(self, seconds: float) -> None:
        """Give up on the exchange after `seconds` of silence: whoever waits on it gets
        `Stalled`, saying what InvoisX had not done."""
        if not self._sent:
            what = "InvoisX stopped taking the request body for"
        elif not self._head_bytes:
            what = "InvoisX did not answer within"
        elif not self.head_in:
            what = "InvoisX's response headers stalled for"
        else:
            what = "InvoisX's answer stalled for"
        self._fail(Stalled(f"{what} {seconds:g} s (INVOISX_PROXY_UPSTREAM_TIMEOUT)."))

    def headers_overdue(self, seconds: float) -> None:
        """Give up on an answer whose headers are not all in after `seconds`, though bytes
        keep coming (each restarts the silence of `time_out`)."""
        self._fail(
            Stalled(
                f"InvoisX's response headers were not complete within {seconds:g} s "
                "(three times INVOISX_PROXY_UPSTREAM_TIMEOUT)."
            )
        )

    @property
    def reusable(self) -> bool:
        """Whether the exchange ended cleanly, so the connection can serve another."""
        return (
            self._sent
            and self.complete
            and self._keep_alive
            and not self._answered_early
            and not self._tainted
            and not self._chunks
            and self._error is None
            and self.is_open
        )

    @property
    def is_open(self) -> bool:
        """Whether the connection can still carry a request."""
        return self._transport is not None and not self._transport.is_closing()

    def park(self) -> None:
        """End the exchange and note when the connection went idle."""
        self._busy = False
        self._reused = True
        self.idle_since = self._loop.time()

    def close(self) -> None:
        """Hang up after an exchange that ended cleanly, or on an idle connection."""
        self._busy = False
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Hang up at once, unsent bytes and all: the exchange was abandoned."""
        self._busy = False
        if self._transport is not None:
            self._transport.abort()

    def _clear_exchange(self, *, head_only: bool) -> None:
        self._head_only = head_only
        self._sent = False
        # The answer came before the request was all sent: InvoisX may not have read the rest.
        self._answered_early = False
        self._keep_alive = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._head_bytes = 0
        self._header_bytes = 0
        self._framing_bytes = 0
        self._coding: bytes | None = None  # Transfer-Encoding, its fields joined
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # names lowercased
        self.head_in = False
        self.complete = False

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._tainted = True
        self.abort()
        self._wake()

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's do not derive from asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.progress += 1
        if not self._busy:
            # Bytes nobody asked for on an idle connection: it cannot be trusted any more.
            self.abort()
            return
        in_head = not self.head_in
        if in_head:
            self._head_bytes += len(data)
        buffered = self._buffered
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Broken("InvoisX answered by switching to another protocol."))
        except httptools.HttpParserError as error:
            if self.complete:
                self._tainted = True
            else:
                self._fail(Broken(_not_http(error, head_in=self.head_in)))
        if in_head:
            if not self.head_in and self._head_bytes > _MAX_HEADER_BYTES:
                self._fail(Broken(_TOO_LARGE_HEADERS))
        elif self._buffered == buffered:
            # Every byte counts as progress, so no timeout ends a trailer that never does.
            self._framing_bytes += len(data)
            if self._framing_bytes > _MAX_HEADER_BYTES:
                self._fail(
                    Broken(
                        "InvoisX's chunk framing or trailers ran over "
                        f"{_MAX_HEADER_BYTES // 1024} KiB without body bytes."
                    )
                )
        else:
            self._framing_bytes = 0

    def eof_received(self) -> bool:
        self._eof = True
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._busy and not self.complete and self._error is None:
            if self.head_in and self._ends_at_close(exc):
                self.complete = True
            elif self._reused and not self._head_bytes:
                self._error = Dropped(
                    f"{_ended(exc)} before any answer (a kept-alive connection, which "
                    "InvoisX may have timed out just as the request arrived)."
                )
            else:
                self._error = Broken(f"{_ended(exc)} {self._cut_where()}.")
        self._busy = False
        self._write_paused = False
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.progress += 1
        self._wake()

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self._tainted = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._tainted or self.head_in:  # trailers after a chunked body: ignored
            return
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > _MAX_HEADER_BYTES:
            self._fail(Broken(_TOO_LARGE_HEADERS))
            return
        name = name.lower()
        if name == b"transfer-encoding":
            # Several fields make one list of codings (RFC 9110, 5.3).
            self._coding = value if self._coding is None else self._coding + b", " + value
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._tainted:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._interim = True
            self.headers = []
            self._coding = None
            return
        if not 200 <= status < 600:
            # The parser takes any three digits; uvicorn has no status line for these.
            self._fail(Broken(f"InvoisX answered with status {status}, which HTTP does not have."))
            return
        coding = self._coding
        if coding is not None and coding.strip(b" \t").lower() != b"chunked":
            # InvoisX frames with Content-Length or chunked. Another coding can be neither
            # undone here nor passed on, the client's hop being framed by its own server. The
            # coding is not named: it is InvoisX's bytes (see `UpstreamError`).
            self._fail(
                Broken(
                    "InvoisX's answer has a Transfer-Encoding other than chunked, which the "
                    "proxy can neither decode nor pass on."
                )
            )
            return
        self.status = status
        self.head_in = True
        self._answered_early = not self._sent
        if self._head_only:
            # The parser cannot be told that a HEAD answer has no body, so it would read the
            # next bytes as one: this answer is complete, and the connection is not reused.
            self.complete = True
            self._tainted = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._tainted:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._read_paused and self._transport:
            self._read_paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._tainted:
            return
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()

    def _cut_where(self) -> str:
        """Where in the exchange a connection that ended early was, for the client."""
        if self.head_in:
            return "in the middle of the answer"
        if self._head_bytes:
            return "in the middle of the response headers"
        if not self._sent:
            return "before the whole request was sent"
        return "before any answer"

    def _ends_at_close(self, exc: Exception | None) -> bool:
        """Whether a closed connection is the proper end of the answer: one with neither length
        nor chunked framing runs until the connection closes. Only a clean close of a plain
        TCP connection counts: a reset cuts it short, and over TLS a cut cannot be told apart
        from a close (asyncio reports both alike), so such an answer stays incomplete there."""
        framing = (b"content-length", b"transfer-encoding")
        unframed = not any(name in framing for name, _ in self.headers)
        return unframed and exc is None and self._eof and not self._tls


class Pool:
    """Keep-alive connections to one origin: at most `limit` sockets, busy and idle together;
    idle connections are reused newest first.

    Each exchange holds a turn, one of the `limit`. A call that finds every turn taken waits: a
    freed turn goes to the longest waiting call, never to a newcomer, so no call is overtaken
    again and again. A turn is given back only when the exchange ends; the forward stage ends
    those held up by their own client (a slow upload, an answer read slowly) after the client
    timeout, so slow clients hold sockets for a bounded time. Bounding the exchanges in flight
    also keeps the proxy's per-call cost flatter under hundreds of concurrent clients (README,
    Performance). The owner calls `expire` now and then: it closes connections idle too long
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
        self._idle: deque[Connection] = deque()
        self._in_use = 0
        # (deadline, turn), oldest first; all wait as long, so deadlines come in order too.
        self._waiters: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._closed = False

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start handing out connections on `loop`."""
        self._loop = loop

    async def acquire(self, *, head_only: bool, fresh: bool = False) -> Connection:
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
                    self._idle.popleft().close()  # room for the new socket
                connection = await self._connect()
        except BaseException:
            self._hand_on()
            raise
        connection.begin(head_only=head_only)
        connection.holds_turn = True
        connection.waited = waited
        return connection

    def release(self, connection: Connection) -> None:
        """End the exchange: keep `connection` for the next one when it ended cleanly, else
        close it. Every acquired connection must come back here, whatever happened."""
        if connection.reusable and not self._closed:
            connection.park()
            self._idle.append(connection)
        elif connection.complete:
            connection.close()
        else:
            connection.abort()  # InvoisX must not take a half-sent request for a whole one
        # After the close: asyncio closes the socket a callback later, before the next call
        # this turn wakes can open one, so the sockets never exceed the limit.
        if connection.holds_turn:
            connection.holds_turn = False
            self._hand_on()

    def expire(self, now: float) -> None:
        """Close connections idle too long (InvoisX may close them first, mid-request) and
        fail the calls that have waited the connect timeout for a connection."""
        while self._idle and now - self._idle[0].idle_since > self._idle_timeout:
            self._idle.popleft().close()
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
            connection = self._idle.pop()
            if connection.is_open:
                return connection
        return None

    def close(self) -> None:
        """Close every idle connection; busy ones close when released."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()

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


_TOO_LARGE_HEADERS = f"InvoisX's response headers ran over {_MAX_HEADER_BYTES // 1024} KiB."


def connect_failure(error: OSError) -> str:
    """What the client is told when no connection to InvoisX could be opened."""
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = "its TLS certificate could not be verified"
    elif isinstance(error, ssl.SSLError):
        reason = "the TLS handshake failed"
    elif isinstance(error, socket.gaierror):
        reason = "its host name could not be resolved"
    elif isinstance(error, ConnectionRefusedError) or _refused_everywhere(str(error)):
        reason = "the connection was refused"
    elif error.errno:
        # From errno alone: asyncio's own text names InvoisX's address ("Connect call failed
        # ('203.0.113.9', 443)"), which is no business of the client's.
        reason = f"the connection failed ({os.strerror(error.errno)})"
    else:
        reason = "the connection failed"
    return f"InvoisX could not be reached: {reason}."


def _refused_everywhere(text: str) -> bool:
    # With several addresses (localhost: ::1 and 127.0.0.1), asyncio raises a plain OSError
    # whose text lists each address's failure.
    errnos = set(re.findall(r"\[Errno (\d+)\]", text))
    return errnos == {str(errno.ECONNREFUSED)}


def _ended(exc: Exception | None) -> str:
    """How a connection to InvoisX ended, as the start of a sentence: a clean close is
    InvoisX's doing; a reset may be InvoisX's or the network's."""
    return "InvoisX closed the connection" if exc is None else "The connection to InvoisX was reset"


def _not_http(error: httptools.HttpParserError, *, head_in: bool) -> str:
    """What was wrong with an answer the parser refused; llhttp's reasons are fixed texts,
    never InvoisX's bytes."""
    text = str(error)[:80]
    reason = text[:1].lower() + text[1:]
    if head_in:
        return f"InvoisX's answer broke its chunked framing ({reason})."
    if reason.startswith("expected HTTP/"):
        return "InvoisX answered with something that is not HTTP."
    if isinstance(error, httptools.HttpParserInvalidStatusError) or any(
        word in reason for word in ("status", "version", "response line")
    ):
        return f"InvoisX's answer has an invalid status line ({reason})."
    return f"InvoisX's answer has invalid headers ({reason})."
