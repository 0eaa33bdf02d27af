"""Limits: what a request may weigh and contain before the proxy reads or holds any of it.

The head is checked first (431 headers, a valid `Content-Length`, 413 for a declared body
over the limit, no control characters in the target); then the body is read within the
same limits as it arrives, whether it streams on to InvoisX or is read whole first (a call
with an Idempotency-Key).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from starlette.types import Message, Receive, Scope

from proxy import errors
from proxy.exchange import Exchange

__all__ = ["Body", "BodyIncomplete", "Limits", "read_whole"]

# What could split the request line: the parser in front refuses these, and so do we.
_UNSAFE_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")


class BodyIncomplete(Exception):
    """The client went away before the last byte of its request body."""


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    values = {value.strip() for name, value in headers if name.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1 or not all(value.isdigit() for value in values):
        raise errors.content_length_invalid()
    return int(values.pop())


class Body:
    """A request body as it arrives: counted into the exchange, refused past the size limit
    or past (or short of) its `Content-Length`; `declared` None when it comes chunked."""

    __slots__ = ("_exchange", "_limit", "declared", "receive")

    def __init__(
        self, receive: Receive, exchange: Exchange, *, declared: int | None, limit: int
    ) -> None:
        self.receive = receive
        self._exchange = exchange
        self.declared = declared
        self._limit = limit

    async def next(self) -> tuple[bytes, bool]:
        """The next chunk, and whether it is the last; `BodyIncomplete` if the client left."""
        return self.take(await self.receive())

    def take(self, message: Message) -> tuple[bytes, bool]:
        """The chunk `message` carries, checked against the limits."""
        if message["type"] == "http.disconnect":
            raise BodyIncomplete()
        chunk: bytes = message.get("body", b"")
        received = self._exchange.bytes_in = self._exchange.bytes_in + len(chunk)
        if received > self._limit:
            raise errors.body_too_large(self._limit)
        last = not message.get("more_body", False)
        declared = self.declared
        # Checked before the chunk goes on: a refused body never reaches InvoisX whole. Only
        # a parser fault could cause a mismatch; InvoisX must never get a body other than the
        # client's, nor an Idempotency-Key keep an answer to one.
        if declared is not None and (received > declared or (last and received != declared)):
            raise errors.body_length_mismatch(received, declared)
        return chunk, last


class Limits:
    """The request limits from the settings, checked on every call's head."""

    def __init__(self, *, max_body: int, max_header_bytes: int, client_timeout: float) -> None:
        self.max_body = max_body
        self.max_header_bytes = max_header_bytes
        self.client_timeout = client_timeout

    def check(self, scope: Scope, receive: Receive, exchange: Exchange) -> Body | None:
        """Refuse a head over the limits; the body to read, None when there is none."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if sum(len(name) + len(value) + 4 for name, value in headers) > self.max_header_bytes:
            raise errors.headers_too_large(self.max_header_bytes)
        length = _content_length(headers)
        if length is not None and length > self.max_body:
            raise errors.body_too_large(self.max_body)
        if _UNSAFE_IN_TARGET.search(scope["raw_path"] + b"?" + scope["query_string"]):
            raise errors.target_not_allowed()
        if any(name.lower() == b"transfer-encoding" for name, _ in headers):
            return Body(receive, exchange, declared=None, limit=self.max_body)
        if length:
            return Body(receive, exchange, declared=length, limit=self.max_body)
        return None


async def read_whole(
    body: Body | None, receive: Receive, *, client_timeout: float, hold: Callable[[int], None]
) -> bytes:
    """The whole body, for a call that must see it before it goes out (idempotency).

    `hold` is told of each chunk's bytes as they come and may refuse them; a client silent
    for `client_timeout` seconds gets 408.
    """
    if body is None:
        # Still one message: a client that left while the call waited is not answered for.
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BodyIncomplete()
        return b""
    parts = bytearray()
    while True:
        try:
            async with asyncio.timeout(client_timeout):
                message = await body.receive()
        except TimeoutError:
            raise errors.body_stalled(client_timeout, len(parts), body.declared) from None
        if message["type"] == "http.request":
            hold(len(message.get("body", b"")))
        chunk, last = body.take(message)
        parts += chunk
        if last:
            return bytes(parts)
