"""The client side of the wire: uvicorn's httptools protocol, with what a proxy must add.

- A request is bounded while it arrives, not once it is whole: a target over
  `MAX_TARGET_BYTES` gets 414, a head over the header limit 431, before the parser has held
  more than one read beyond the limit; so do chunk framing and trailers that run on without
  body bytes. A head must also arrive within the client timeout (408).
- Trailers never join the request's headers: the checks have run on the head by then, and a
  trailing `Content-Type` would reach InvoisX unchecked.
- An offer to switch protocols that the proxy does not take (`Upgrade: h2c` with
  `HTTP2-Settings`, sent by default by Java's `HttpClient`, curl `--http2` and others) is
  ignored, as RFC 9110 allows, and the request is read on as HTTP/1.1. httptools tells
  llhttp to skip the body of any request that offers an upgrade and then stops
  (MagicStack/httptools#124, Kludex/uvicorn#2722), which dropped such bodies.
- What the parser refuses is answered in the InvoisX envelope and reported to the app (an
  audit line and a metric), instead of uvicorn's plain-text 400 that left no trace.

Only `data_received` and `on_headers_complete` are overridden on the hot path of a call
without a body: every other callback layer would cost each request a Python call.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn._types import HTTPScope
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy import errors
from proxy.errors import ProxyError, envelope

__all__ = ["MAX_TARGET_BYTES", "ClientProtocol", "WireRefusal", "client_protocol", "idle_bound"]

# nginx's default for a request line; InvoisX's targets are a path and a short query.
MAX_TARGET_BYTES = 8192
# Chunk framing and trailers in a row without a body byte, as for InvoisX's answers.
_MAX_FRAMING_BYTES = 65_536
# A made-up head that makes a fresh parser read exactly the body that follows an ignored
# upgrade offer, framed as the offer framed it; its callbacks are not the client's.
_BODY_HEAD = b"POST / HTTP/1.1\r\n%b\r\n"
_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


@dataclass(frozen=True, slots=True)
class WireRefusal:
    """A request refused before it reached the app: who sent it and what they were told."""

    peer: tuple[str, int] | None
    method: str
    error: ProxyError


# Records the refusal (audit, metrics); returns the request id to answer with.
Report = Callable[[WireRefusal], str]


class _TargetTooLong(Exception):
    """Raised from a parser callback; the parser turns it into an error we catch."""


class ClientProtocol(HttpToolsProtocol):
    """One client connection; `client_protocol` makes the subclass that carries the limits."""

    max_header_bytes = 32_768
    client_timeout = 10.0
    report: Report = staticmethod(lambda refusal: "")
    # The connections of this server now idle between calls, oldest first, and how many may
    # be: past it the one idle longest is closed, so idle clients cannot run the process out
    # of file descriptors however long the keep-alive timeout is.
    idle: ClassVar[dict[ClientProtocol, None]] = {}
    max_idle = 1000

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # The scope whose head or body is being counted, and its bytes counted so far: for a
        # head, of reads that began inside it (where in a read a head starts is not known);
        # for a body, framing and trailer bytes since the last body byte.
        self._counted: HTTPScope | None = None
        self._seen = 0
        # Body bytes parsed on this connection, those uvicorn drops after an answer included.
        self._body_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._websocket = False
        # The framing of a body the parser was told to skip (an ignored upgrade offer).
        self._skipped_body: bytes | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        self.idle.pop(self, None)
        super().connection_lost(exc)

    # --- keep-alive -------------------------------------------------------------------------

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # not closing, no pipelined call next
            self._count_idle()

    def _count_idle(self) -> None:
        idle = self.idle
        idle[self] = None
        if len(idle) > self.max_idle:
            oldest = next(iter(idle))
            del idle[oldest]
            oldest.transport.close()

    def _idle_again(self) -> None:
        """After a read that started no call (blank lines, the rest of a body answered
        early): idle as before it, or the read would have stopped the keep-alive clock and
        the count for good."""
        if self.pipeline or self.transport.is_closing() or "method" not in (self.scope or {}):
            return  # a call waits, the connection is going, or a new head is arriving
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        self._count_idle()

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn's, plus: the connection is busy again (or gone), no longer idle.
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
            self.idle.pop(self, None)

    # --- reading ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        while data:
            data = self._feed(data)
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and self.timeout_keep_alive_task is None:
            self._idle_again()

    def _feed(self, data: bytes) -> bytes:
        """Parse one read; what is left to parse after an ignored upgrade offer."""
        scope, body_before = self.scope, self._body_bytes
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self._websocket:
                self.handle_websocket_upgrade()
                return b""
            self._resume_skipped_body()
            return data[upgrade.args[0] :]
        except httptools.HttpParserCallbackError as error:
            too_long = isinstance(error.__context__, _TargetTooLong)
            self._refuse(
                errors.target_too_long(MAX_TARGET_BYTES) if too_long else errors.not_http()
            )
            return b""
        except httptools.HttpParserError:
            self._refuse(errors.not_http())
            return b""
        self._bound(len(data), scope, self._body_bytes - body_before)
        return b""

    def _bound(self, size: int, scope: HTTPScope | None, delivered: int) -> None:
        """After a read: refuse a head, or a body's framing, that has run over its limit."""
        current = self.scope
        if current is None:
            return
        if "method" not in current:  # uvicorn sets it once the head is complete
            if self._counted is not current:
                self._counted, self._seen = current, 0
                self._arm_head_timer()
            if current is scope:  # the read began inside this head
                self._seen += size
            # The exact check of the headers comes later (forward); this one bounds memory.
            if len(self.url) > MAX_TARGET_BYTES:
                self._refuse(errors.target_too_long(MAX_TARGET_BYTES))
            elif self._seen > self.max_header_bytes + MAX_TARGET_BYTES:
                self._refuse(errors.headers_too_large(self.max_header_bytes))
            return
        reading = self.cycle
        if reading is None or not reading.more_body:
            return
        if self._counted is not current:
            self._counted, self._seen = current, 0
        self._seen = 0 if delivered else self._seen + size
        if self._seen > _MAX_FRAMING_BYTES:
            self._refuse(errors.framing_too_large(_MAX_FRAMING_BYTES))

    def _resume_skipped_body(self) -> None:
        """After an ignored upgrade offer: read its body, which the parser skipped, and what
        follows with a fresh parser."""
        framing, self._skipped_body = self._skipped_body, None
        if framing is None:
            return
        # The parser ended the message at its head; the ASGI task has not run yet.
        self.cycle.more_body = True
        self.cycle.message_event.clear()
        resumed = _Resumed(self)
        self.parser = httptools.HttpRequestParser(resumed)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.parser.feed_data(_BODY_HEAD % framing)
        resumed.made_up = False

    def _refuse(self, error: ProxyError) -> None:
        """Tell the app, answer `error` in the envelope, and close the connection."""
        self._disarm_head_timer()
        method = self.scope.get("method", "") if self.scope else ""
        request_id = self.report(WireRefusal(self.client, method, error))
        # With a call in flight on this connection, an answer now would be taken for that
        # call's answer: closing is the only honest signal left.
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            body = envelope(error.error_code, error.message)
            self.transport.write(
                b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"x-request-id: %b\r\nconnection: close\r\n\r\n%b"
                % (error.status, _REASONS[error.status], len(body), request_id.encode(), body)
            )
        self.transport.close()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.client_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.scope is None:  # not a byte since the connection opened
            self.transport.close()
        elif "method" not in self.scope:
            self._refuse(errors.head_too_slow(self.client_timeout))

    # --- parser callbacks -------------------------------------------------------------------

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        if len(self.url) > MAX_TARGET_BYTES:
            raise _TargetTooLong()
        super().on_headers_complete()
        self._websocket = self.parser.should_upgrade() and self._should_upgrade()
        if self._websocket:
            return  # uvicorn's later callbacks read the headers to know it is one
        if self.parser.should_upgrade():
            self._skipped_body = _framing(self.headers)
        # Trailers go to a list nobody reads; the scope keeps the head's headers.
        self.headers = []


class _Resumed:
    """The parser callbacks after an ignored upgrade offer: those of the made-up head that
    resumes the skipped body are dropped, everything else goes to the connection."""

    def __init__(self, protocol: ClientProtocol) -> None:
        self.protocol = protocol
        self.made_up = True
        self.on_body = protocol.on_body
        self.on_message_complete = protocol.on_message_complete

    def on_message_begin(self) -> None:
        if not self.made_up:
            self.protocol.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.made_up:
            self.protocol.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.made_up:
            self.protocol.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self.made_up:
            self.protocol.on_headers_complete()


def _framing(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The framing header of a request's body, or None when it has none."""
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return b"transfer-encoding: chunked\r\n"
        if name == b"content-length":
            length = value
    if length is None or length.strip(b" \t") in (b"", b"0"):
        return None
    return b"content-length: %b\r\n" % length.strip(b" \t")


def idle_bound(wanted: int) -> int:
    """`wanted`, or half the process's file-descriptor limit if that is lower."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return wanted if soft == resource.RLIM_INFINITY else max(1, min(wanted, soft // 2))


def client_protocol(
    *, max_header_bytes: int, client_timeout: float, max_idle: int, report: Report
) -> type[ClientProtocol]:
    """The protocol class for uvicorn's `http` option, with these limits and this reporter.

    Each call makes a new class, so each server counts its own idle connections.
    """
    return type(
        "ClientProtocol",
        (ClientProtocol,),
        {
            "max_header_bytes": max_header_bytes,
            "client_timeout": client_timeout,
            "report": staticmethod(report),
            "idle": {},
            "max_idle": idle_bound(max_idle),
        },
    )
