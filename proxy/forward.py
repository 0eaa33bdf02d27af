"""Forwarding: one request to InvoisX with the server-held token, streamed both ways.

Only end-to-end headers cross the proxy. The client's credentials, cookies and routing
headers never reach InvoisX; cookies and hop-by-hop headers never come back.
Upstream failures are translated here, at one boundary, into 502 or 504.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from starlette.types import Receive, Scope, Send

from proxy.errors import Decision, ProxyError

__all__ = ["Exchange", "Forwarder", "request_headers", "response_headers"]

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
}
_NEVER_DOWNSTREAM = _HOP_BY_HOP | {b"set-cookie", b"x-request-id"}
_JSON = b"application/json"
# nginx's convention for "client closed the connection before the response was complete".
_CLIENT_CLOSED = 499
# InvoisX error bodies are small; this bounds what is kept to read their error_code.
_ERROR_PEEK_BYTES = 65_536


@dataclass(slots=True)
class Exchange:
    """One request's progress through the proxy: what the audit line reports."""

    request_id: str
    status: int = 0
    decision: Decision = "forwarded"
    error_code: str | None = None
    upstream_ms: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0


class ClientDisconnected(Exception):
    """The client went away before the exchange finished."""


class _DisconnectWatch:
    """Cancels the forwarding task when its client disconnects, so InvoisX work stops too.

    It may only listen once the request body has been read: before that, `receive()` belongs
    to the body stream.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[None] | None = None
        self.disconnected = False

    def start(self) -> None:
        owner = asyncio.current_task()
        assert owner is not None
        self._task = asyncio.create_task(self._watch(owner))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self, owner: asyncio.Task[None]) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        owner.cancel()


def _named_in_connection(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(token.strip().lower() for token in value.split(b","))
    return names


def request_headers(
    headers: list[tuple[bytes, bytes]], authorization: bytes, has_body: bool, request_id: str
) -> list[tuple[bytes, bytes]]:
    """The headers to send upstream: the client's end-to-end ones plus the injected ones."""
    dropped = _NEVER_UPSTREAM | _named_in_connection(headers)
    kept: list[tuple[bytes, bytes]] = []
    accept: bytes | None = None
    has_content_type = False
    for raw_name, value in headers:
        name = raw_name.lower()
        if name in dropped or name.startswith(b"x-forwarded-"):
            continue
        if name == b"accept":
            accept = value
            continue
        has_content_type = has_content_type or name == b"content-type"
        kept.append((name, value))
    # InvoisX (Laravel) answers auth errors with redirects unless JSON is asked for.
    if accept is None or accept.strip() in (b"", b"*/*"):
        accept = _JSON
    kept.append((b"accept", accept))
    if has_body and not has_content_type:
        kept.append((b"content-type", _JSON))
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


def _too_large(limit: int) -> ProxyError:
    return ProxyError(
        413,
        "PAYLOAD_TOO_LARGE",
        f"The request body is larger than {limit} bytes (INVOISX_PROXY_MAX_BODY_BYTES).",
    )


def _error_code(status: int, content_type: str, body: bytes) -> str | None:
    if status < 400 or "json" not in content_type:
        return None
    try:
        code = json.loads(body).get("error_code")
    except (ValueError, AttributeError):
        return None
    # The code ends up in the audit line: keep only what looks like an InvoisX code.
    if isinstance(code, str) and len(code) <= 64 and code.replace("_", "").isalnum():
        return code
    return None


class Forwarder:
    """Sends requests to the upstream base URL through one shared httpx client."""

    def __init__(
        self, client: httpx.AsyncClient, *, base_url: str, authorization: bytes, max_body: int
    ) -> None:
        self._client = client
        self._base_url = base_url
        self._authorization = authorization
        self._max_body = max_body

    async def __call__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        exchange: Exchange,
    ) -> None:
        """Forward one request to `path` below the base URL; raises `ProxyError` before replying."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        length = _content_length(headers)
        if length is not None and length > self._max_body:
            raise _too_large(self._max_body)
        chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
        has_body = chunked or bool(length)
        url = self._base_url + path
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        watch = _DisconnectWatch(receive)
        request = httpx.Request(
            scope["method"],
            url,
            headers=request_headers(headers, self._authorization, has_body, exchange.request_id),
            content=self._body(receive, exchange, watch) if has_body else None,
        )
        if not has_body:
            watch.start()
        try:
            await self._exchange(request, send, exchange, watch)
        except (asyncio.CancelledError, ClientDisconnected):
            if not watch.disconnected:
                raise
            # Our own watch cancelled us: the client is gone, which is not a server failure.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            exchange.status = exchange.status or _CLIENT_CLOSED
            exchange.decision = "upstream_error"
            exchange.error_code = "CLIENT_DISCONNECTED"
        finally:
            watch.stop()

    async def _body(
        self, receive: Receive, exchange: Exchange, watch: _DisconnectWatch
    ) -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                watch.disconnected = True
                raise ClientDisconnected
            chunk: bytes = message.get("body", b"")
            exchange.bytes_in += len(chunk)
            if exchange.bytes_in > self._max_body:
                raise _too_large(self._max_body)
            if not message.get("more_body", False):
                watch.start()
                if chunk:
                    yield chunk
                return
            if chunk:
                yield chunk

    async def _exchange(
        self,
        request: httpx.Request,
        send: Send,
        exchange: Exchange,
        watch: _DisconnectWatch,
    ) -> None:
        started = time.perf_counter()
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as error:
            raise ProxyError(
                504,
                "UPSTREAM_TIMEOUT",
                "InvoisX did not answer in time (INVOISX_PROXY_UPSTREAM_TIMEOUT).",
                decision="upstream_error",
            ) from error
        except httpx.TransportError as error:
            raise ProxyError(
                502,
                "UPSTREAM_UNAVAILABLE",
                "InvoisX could not be reached. Try again shortly.",
                decision="upstream_error",
            ) from error
        exchange.upstream_ms = (time.perf_counter() - started) * 1000
        try:
            await self._relay(response, send, exchange, watch)
        finally:
            await response.aclose()

    async def _relay(
        self,
        response: httpx.Response,
        send: Send,
        exchange: Exchange,
        watch: _DisconnectWatch,
    ) -> None:
        exchange.status = response.status_code
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": response_headers(response.headers.raw, exchange.request_id),
            }
        )
        peek = bytearray() if response.status_code >= 400 else None
        try:
            async for chunk in response.aiter_raw():
                exchange.bytes_out += len(chunk)
                if peek is not None and len(peek) < _ERROR_PEEK_BYTES:
                    peek += chunk
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.TransportError:
            # The status line is already out: closing the connection without the final chunk
            # is the only honest way left to tell the client the body is incomplete.
            exchange.decision = "upstream_error"
            exchange.error_code = "UPSTREAM_UNAVAILABLE"
            return
        # Once the last chunk is sent the server reports a disconnect; that one is not ours.
        watch.stop()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if peek is not None and not response.headers.get("content-encoding"):
            content_type = response.headers.get("content-type", "")
            exchange.error_code = _error_code(response.status_code, content_type, bytes(peek))
