"""Relaying InvoisX's answer to the client: headers filtered, the token masked out of every
byte, a copy kept when the answer is to be replayed (idempotency), its error code read.
"""

from __future__ import annotations

import json

from starlette.types import Send
from structlog.typing import FilteringBoundLogger

from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.stages.idempotency import Capture
from proxy.upstream.deadlines import CallWatch
from proxy.upstream.errors import Broken, Stalled, failure
from proxy.upstream.headers import response_headers
from proxy.upstream.http11 import Connection
from proxy.upstream.scrub import Scrub

__all__ = ["Relay", "error_code"]

# InvoisX error bodies are small; this bounds what is kept to read their error_code.
ERROR_PEEK_BYTES = 65_536


def error_code(status: int, content_type: bytes, body: bytes) -> str | None:
    """The `error_code` of an InvoisX error answer, when it has a plausible one."""
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
        if self.peek is not None and len(self.peek) < ERROR_PEEK_BYTES:
            self.peek += chunk
        if chunk or last:  # a chunk may go whole into the scrub's carry
            self._ready.append((chunk, last))
        self.last = last
        return masked

    def take_ready(self) -> list[tuple[bytes, bool]]:
        """The chunks taken in and not yet sent, with whether each is the last."""
        ready, self._ready = self._ready, []
        return ready


class Relay:
    """Passes answers on; logs and counts every copy of the token kept out of one."""

    def __init__(self, *, log: FilteringBoundLogger, metrics: Metrics) -> None:
        self._log = log
        self._metrics = metrics

    async def __call__(
        self,
        connection: Connection,
        send: Send,
        exchange: Exchange,
        call: CallWatch,
        capture: Capture | None,
        scrub: Scrub,
    ) -> None:
        """Send the answer whose head `connection` has received; raises `ProxyError` only
        while nothing has gone to the client."""
        status = connection.status
        notable = dict(connection.headers)
        exchange.answered(status, notable.get(b"x-ratelimit-remaining"))
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
                    raise failure(error) from error
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
                exchange.aborted(failure(error))
                return
        if answer.peek is not None and b"content-encoding" not in notable:
            content_type = notable.get(b"content-type", b"")
            exchange.error_code = error_code(status, content_type, bytes(answer.peek))

    async def _more(self, connection: Connection, call: CallWatch, answer: _Answer) -> None:
        """Hand the answer's next body bytes (or its end) from InvoisX to `answer`."""
        call.waiting = True
        try:
            await connection.more()
        finally:
            call.waiting = False
        masked = answer.add(connection.take(), connection.complete)
        if masked:
            self._scrubbed(answer.exchange, "body", masked, occurrences=masked)

    def _scrubbed(self, exchange: Exchange, where: str, count: int, **detail: object) -> None:
        """Log and count the token kept out of an answer (never the token itself)."""
        self._log.warning("token_scrubbed", request_id=exchange.request_id, where=where, **detail)
        self._metrics.token_scrubbed(where, count)
