"""HTTP/1.1 to InvoisX on asyncio transports: the request written, the answer parsed by
httptools, both in one place, with the connection's state explicit.

The forwarder needs little of an HTTP client: one origin, requests it has already vetted
and framed, bodies passed through as bytes. A general client (aiohttp) spent as much CPU per
call as all the proxy's other stages together (bench/README.md), so this module does that
little itself: httptools (llhttp, the parser uvicorn uses for requests) reads the answers,
and the pool (`proxy.upstream.pool`) keeps connections alive to save the connect. No proxy
variables or .netrc are read, no cookies kept, and TLS certificates are always verified.

A connection serves one exchange at a time: `begin`, `send` the request, await
`response_head`, then `take` body bytes until `complete` (awaiting `more` in between). Each
exchange gets a fresh `_Exchange` record, as uvicorn makes a cycle for each request; the
connection itself is only `State.NEW`, `ACTIVE`, `IDLE` or `CLOSED`. Timeouts are the
caller's: it watches `progress` and calls `time_out`, so a call costs no timer of its own.

A connection kept alive is reused only after an exchange that ended cleanly. Bytes that come
with an answer but beyond it are caught; bytes an upstream sends later, after the answer
looked complete, cannot be told apart from its next answer: a limit of HTTP/1.1 keep-alive.
A reused connection that closes before any byte of its answer fails with `Dropped`: InvoisX
may have closed it while it sat idle, so the caller may send a safe request again.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

from proxy.upstream.errors import Broken, Dropped, Stalled, UpstreamError, answer_failure, ended

__all__ = ["Connection", "Origin", "State", "chunk", "request_head"]

# Response bytes held for a client that reads slower than InvoisX sends, before reading pauses.
_HIGH_WATER = 262_144
# The parser sets no limit on response headers; InvoisX's are a few hundred bytes. Counted
# header by header, and as bytes received while the head is incomplete: the parser grows an
# unfinished header value without bound, at quadratic cost. The same bounds the bytes in a
# row after the head that carry no body (chunk framing, trailers), which grow alike.
_MAX_HEADER_BYTES = 65_536
_TOO_LARGE_HEADERS = f"InvoisX's response headers ran over {_MAX_HEADER_BYTES // 1024} KiB."
_DEFAULT_PORTS = {"http": 80, "https": 443}


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


def request_head(
    method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]]
) -> bytes:
    """The request line and headers, `host` first, ending with the blank line."""
    lines = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host]
    for name, value in headers:
        lines += (b"\r\n", name, b": ", value)
    lines.append(b"\r\n\r\n")
    return b"".join(lines)


def chunk(data: bytes, last: bool) -> bytes:
    """`data` framed as one chunk of a chunked body, with the final chunk when `last`."""
    framed = b"%x\r\n%b\r\n" % (len(data), data) if data else b""
    return framed + b"0\r\n\r\n" if last else framed


class State(enum.Enum):
    """Where a connection stands. A failure closes it at once; an exchange whose stream can no
    longer be trusted (`_Exchange.tainted`) ends, and its connection is closed at release."""

    NEW = "new"  # connected, no exchange yet
    ACTIVE = "active"  # serving an exchange
    IDLE = "idle"  # kept alive for the next exchange
    CLOSED = "closed"  # closed or lost: never used again


@dataclass(slots=True, repr=False, eq=False)  # no repr: it would show InvoisX's bytes
class _Exchange:
    """One request and its answer on a connection; a fresh one for each exchange."""

    head_only: bool  # HEAD: the answer has no body
    reused: bool  # the connection served an exchange before this one
    sent: bool = False  # the whole request went out
    # The answer came before the request was all sent: InvoisX may not have read the rest.
    answered_early: bool = False
    keep_alive: bool = False
    chunks: list[bytes] = field(default_factory=list)  # body bytes not yet taken
    buffered: int = 0
    head_bytes: int = 0
    header_bytes: int = 0
    framing_bytes: int = 0
    coding: bytes | None = None  # Transfer-Encoding, its fields joined
    interim: bool = False  # inside a 1xx answer, the real one to follow
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # names lowercased
    head_in: bool = False
    complete: bool = False
    # The stream can no longer be trusted to start where a next exchange expects (a failure,
    # a second response, garbage, a body to a HEAD): later parser callbacks are ignored and
    # the connection is never reused.
    tainted: bool = False
    error: UpstreamError | None = None


class Connection(asyncio.Protocol):
    """One keep-alive connection to InvoisX: its state, and the exchange it is serving."""

    __slots__ = (
        "_eof",
        "_exchange",
        "_loop",
        "_parser",
        "_read_paused",
        "_tls",
        "_transport",
        "_waiter",
        "_write_paused",
        "progress",
        "state",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, *, tls: bool) -> None:
        self._loop = loop
        self._tls = tls
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._eof = False
        self._exchange = _Exchange(head_only=False, reused=False)  # none yet: nothing to report
        self.state = State.NEW
        # Bytes received and upload room regained: what a caller watches to tell a stall.
        self.progress = 0

    def __repr__(self) -> str:
        if self.state is State.NEW:
            return "<Connection new>"
        x = self._exchange  # the one it serves, or its last
        stage = "sent" if x.sent else "sending"
        if x.head_in:  # as is every complete answer
            stage = "complete" if x.complete else "head in"
        tainted = ", tainted" if x.tainted else ""
        return f"<Connection {self.state.value}: {stage}, status {x.status}{tainted}>"

    # --- the exchange, as the forwarder drives it -----------------------------------------

    @property
    def status(self) -> int:
        """The answer's status (0 until its head is in)."""
        return self._exchange.status

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The answer's headers, names lowercased."""
        return self._exchange.headers

    @property
    def head_in(self) -> bool:
        """Whether the answer's status line and headers are all in."""
        return self._exchange.head_in

    @property
    def complete(self) -> bool:
        """Whether the whole answer is in."""
        return self._exchange.complete

    def begin(self, *, head_only: bool) -> None:
        """Start an exchange; `head_only` for HEAD, whose answer has no body."""
        self._exchange = _Exchange(head_only=head_only, reused=self.state is State.IDLE)
        self.state = State.ACTIVE

    def send(self, data: bytes, *, last: bool) -> None:
        """Write request bytes; `last` marks the request as complete."""
        assert self._transport is not None
        self._exchange.sent = last
        self._transport.write(data)

    async def drain(self) -> None:
        """Wait until InvoisX takes more of the upload, or has already answered; raise when
        the connection is gone, since the rest of the upload is moot then."""
        x = self._exchange
        while self._write_paused and not x.head_in:
            await self._wait()
        if x.head_in:
            return
        if x.error is not None:
            raise x.error
        if not self.is_open:
            # A failed write closes the transport at once; connection_lost comes a turn later.
            raise Broken("The connection to InvoisX broke while the request body was being sent.")

    async def response_head(self) -> None:
        """Wait for the answer's status line and headers (`status`, `headers`)."""
        while not self._exchange.head_in:
            await self._wait()

    async def more(self) -> None:
        """Wait until more body bytes or the end of the answer arrive."""
        x = self._exchange
        while not x.chunks and not x.complete:
            await self._wait()

    def take(self) -> bytes:
        """The body bytes received and not yet taken."""
        x = self._exchange
        chunks = x.chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        x.buffered = 0
        if self._read_paused and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()
        return data

    def time_out(self, seconds: float) -> None:
        """Give up on the exchange after `seconds` of silence: whoever waits on it gets
        `Stalled`, saying what InvoisX had not done."""
        x = self._exchange
        if not x.sent:
            what = "InvoisX stopped taking the request body for"
        elif not x.head_bytes:
            what = "InvoisX did not answer within"
        elif not x.head_in:
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
        x = self._exchange
        return (
            x.sent
            and x.complete
            and x.keep_alive
            and not x.answered_early
            and not x.tainted
            and not x.chunks
            and x.error is None
            and self.is_open
        )

    @property
    def is_open(self) -> bool:
        """Whether the connection can still carry a request."""
        return self._transport is not None and not self._transport.is_closing()

    def park(self) -> None:
        """End a clean exchange and keep the connection for the next."""
        self.state = State.IDLE

    def close(self) -> None:
        """Hang up after an exchange that ended cleanly, or on an idle connection."""
        self.state = State.CLOSED
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Hang up at once, unsent bytes and all: the exchange was abandoned."""
        self.state = State.CLOSED
        if self._transport is not None:
            self._transport.abort()

    async def _wait(self) -> None:
        if self._exchange.error is not None:
            raise self._exchange.error
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
        x = self._exchange
        if x.error is None:
            x.error = error
        x.tainted = True
        self.abort()
        self._wake()

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's do not derive from asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.progress += 1
        if self.state is not State.ACTIVE:
            # Bytes nobody asked for on an idle connection: it cannot be trusted any more.
            self.abort()
            return
        x = self._exchange
        in_head = not x.head_in
        if in_head:
            x.head_bytes += len(data)
        buffered = x.buffered
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Broken("InvoisX answered by switching to another protocol."))
        except httptools.HttpParserError as error:
            if x.complete:
                x.tainted = True
            else:
                self._fail(Broken(answer_failure(error, head_in=x.head_in)))
        if in_head:
            if not x.head_in and x.head_bytes > _MAX_HEADER_BYTES:
                self._fail(Broken(_TOO_LARGE_HEADERS))
        elif x.buffered == buffered:
            # Every byte counts as progress, so no timeout ends a trailer that never does.
            x.framing_bytes += len(data)
            if x.framing_bytes > _MAX_HEADER_BYTES:
                self._fail(
                    Broken(
                        "InvoisX's chunk framing or trailers ran over "
                        f"{_MAX_HEADER_BYTES // 1024} KiB without body bytes."
                    )
                )
        else:
            x.framing_bytes = 0

    def eof_received(self) -> bool:
        self._eof = True
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        x = self._exchange
        if self.state is State.ACTIVE and not x.complete and x.error is None:
            if x.head_in and self._ends_at_close(exc):
                x.complete = True
            elif x.reused and not x.head_bytes:
                x.error = Dropped(
                    f"{ended(exc)} before any answer (a kept-alive connection, which "
                    "InvoisX may have timed out just as the request arrived)."
                )
            else:
                x.error = Broken(f"{ended(exc)} {self._cut_where()}.")
        self.state = State.CLOSED
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
        x = self._exchange
        if x.complete:
            x.tainted = True

    def on_header(self, name: bytes, value: bytes) -> None:
        x = self._exchange
        if x.tainted or x.head_in:  # trailers after a chunked body: ignored
            return
        x.header_bytes += len(name) + len(value)
        if x.header_bytes > _MAX_HEADER_BYTES:
            self._fail(Broken(_TOO_LARGE_HEADERS))
            return
        name = name.lower()
        if name == b"transfer-encoding":
            # Several fields make one list of codings (RFC 9110, 5.3).
            x.coding = value if x.coding is None else x.coding + b", " + value
        x.headers.append((name, value))

    def on_headers_complete(self) -> None:
        x = self._exchange
        if x.tainted:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            x.interim = True
            x.headers = []
            x.coding = None
            return
        if not 200 <= status < 600:
            # The parser takes any three digits; uvicorn has no status line for these.
            self._fail(Broken(f"InvoisX answered with status {status}, which HTTP does not have."))
            return
        coding = x.coding
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
        x.status = status
        x.head_in = True
        x.answered_early = not x.sent
        if x.head_only:
            # The parser cannot be told that a HEAD answer has no body, so it would read the
            # next bytes as one: this answer is complete, and the connection is not reused.
            x.complete = True
            x.tainted = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        x = self._exchange
        if x.tainted:
            return
        x.chunks.append(body)
        x.buffered += len(body)
        if x.buffered > _HIGH_WATER and not self._read_paused and self._transport:
            self._read_paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        x = self._exchange
        if x.tainted:
            return
        if x.interim:
            x.interim = False
            return
        x.complete = True
        x.keep_alive = self._parser.should_keep_alive()
        self._wake()

    def _cut_where(self) -> str:
        """Where in the exchange a connection that ended early was, for the client."""
        x = self._exchange
        if x.head_in:
            return "in the middle of the answer"
        if x.head_bytes:
            return "in the middle of the response headers"
        if not x.sent:
            return "before the whole request was sent"
        return "before any answer"

    def _ends_at_close(self, exc: Exception | None) -> bool:
        """Whether a closed connection is the proper end of the answer: one with neither length
        nor chunked framing runs until the connection closes. Only a clean close of a plain
        TCP connection counts: a reset cuts it short, and over TLS a cut cannot be told apart
        from a close (asyncio reports both alike), so such an answer stays incomplete there."""
        framing = (b"content-length", b"transfer-encoding")
        unframed = not any(name in framing for name, _ in self._exchange.headers)
        return unframed and exc is None and self._eof and not self._tls
