"""Forwarding: one request to InvoisX with the server-held token, streamed both ways.

Only end-to-end headers cross the proxy. The client's credentials, cookies and routing
headers never reach InvoisX; cookies and hop-by-hop headers never come back.
Upstream failures are translated here, at one boundary, into 502 or 504.

The upstream client is aiohttp rather than httpx: on this hot path httpx's connection pool
cost about a millisecond a request and degraded under concurrency (README, Performance).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from starlette.types import Receive, Scope, Send
from yarl import URL

from proxy import __version__
from proxy.errors import Decision, ProxyError
from proxy.policy import Permission

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
    # A Laravel backend would run the named method instead of the one the policy checked.
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
}
_NEVER_DOWNSTREAM = _HOP_BY_HOP | {b"set-cookie", b"x-request-id"}
_JSON = b"application/json"
_USER_AGENT = f"invoisx-proxy/{__version__}"
# Seconds an exchange may run before the proxy starts listening for a client disconnect.
_WATCH_AFTER = 1.0
# nginx's convention for "client closed the connection before the response was complete".
_CLIENT_CLOSED = 499
# InvoisX error bodies are small; this bounds what is kept to read their error_code.
_ERROR_PEEK_BYTES = 65_536


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
    ratelimit_remaining: str | None = None


class ClientDisconnected(Exception):
    """The client went away before the exchange finished."""


class _DisconnectWatch:
    """Cancels the forwarding task when its client disconnects, so InvoisX work stops too.

    It may only listen once the request body has been read: before that, `receive()` belongs
    to the body stream. Listening takes a task, so it begins only when an exchange outlasts
    `_WATCH_AFTER`: a quick answer is over before a disconnect could save much work.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        # The request body is streamed from aiohttp's writer task, so remember the task that
        # handles the request now: that is the one to cancel.
        self._owner = asyncio.current_task()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self.disconnected = False

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(_WATCH_AFTER, self._listen)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _listen(self) -> None:
        assert self._owner is not None
        self._timer = None
        self._task = asyncio.create_task(self._watch(self._owner))

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


def _utf8(value: bytes) -> str:
    # The HTTP client re-encodes header values as UTF-8: only UTF-8 passes byte for byte.
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise ProxyError(400, "BAD_REQUEST", "A header value is not valid UTF-8.") from None


def request_headers(
    headers: list[tuple[bytes, bytes]], authorization: str, has_body: bool, request_id: str
) -> list[tuple[str, str]]:
    """The headers to send upstream: the client's end-to-end ones plus the injected ones."""
    dropped = _NEVER_UPSTREAM | _named_in_connection(headers)
    kept: list[tuple[str, str]] = []
    present: set[bytes] = set()
    accept: bytes | None = None
    for raw_name, value in headers:
        name = raw_name.lower()
        if name in dropped or name.startswith(b"x-forwarded-"):
            continue
        if name == b"accept":
            accept = value
            continue
        present.add(name)
        kept.append((name.decode("latin-1"), _utf8(value)))
    # InvoisX (Laravel) answers auth errors with redirects unless JSON is asked for.
    if accept is None or accept.strip() in (b"", b"*/*"):
        accept = _JSON
    kept.append(("accept", accept.decode("latin-1")))
    if has_body and b"content-type" not in present:
        kept.append(("content-type", "application/json"))
    # Otherwise the HTTP client would add its own: a compressed body that the client never
    # asked for, and its version string.
    if b"accept-encoding" not in present:
        kept.append(("accept-encoding", "identity"))
    if b"user-agent" not in present:
        kept.append(("user-agent", _USER_AGENT))
    kept.append(("x-request-id", request_id))
    kept.append(("authorization", authorization))
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


def _headers_too_large(limit: int) -> ProxyError:
    return ProxyError(
        431,
        "HEADERS_TOO_LARGE",
        f"The request headers are larger than {limit} bytes (INVOISX_PROXY_MAX_HEADER_BYTES).",
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


class _RequestBody:
    """The client's request body as an async iterator, within the size limit.

    aiohttp reads it from its own writer task and reports any failure as a connection error,
    so the real reason (too large, client gone) is kept here for the handler to raise.
    """

    def __init__(
        self,
        receive: Receive,
        limit: int,
        exchange: Exchange,
        watch: _DisconnectWatch,
        stall_timeout: float,
    ) -> None:
        self._receive = receive
        self._limit = limit
        self._exchange = exchange
        self._watch = watch
        self._stall_timeout = stall_timeout
        self.error: ProxyError | ClientDisconnected | None = None
        # aiohttp has no write timeout: an upstream that stops reading would hold the upload
        # forever. The sender arms this deadline; every chunk taken pushes it back.
        self.deadline: asyncio.Timeout | None = None

    def _progress(self, done: bool = False) -> None:
        if self.deadline is not None:
            loop = asyncio.get_running_loop()
            self.deadline.reschedule(None if done else loop.time() + self._stall_timeout)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            self._progress()
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._watch.disconnected = True
                self.error = ClientDisconnected()
                raise self.error
            chunk: bytes = message.get("body", b"")
            self._exchange.bytes_in += len(chunk)
            if self._exchange.bytes_in > self._limit:
                self.error = _too_large(self._limit)
                raise self.error
            if not message.get("more_body", False):
                self._watch.start()
                if chunk:
                    yield chunk
                # From here on aiohttp's read timeout covers the wait for the answer.
                self._progress(done=True)
                return
            if chunk:
                yield chunk


def _unavailable() -> ProxyError:
    return ProxyError(
        502,
        "UPSTREAM_UNAVAILABLE",
        "InvoisX could not be reached. Try again shortly.",
        decision="upstream_error",
    )


def _timed_out() -> ProxyError:
    return ProxyError(
        504,
        "UPSTREAM_TIMEOUT",
        "InvoisX did not answer in time (INVOISX_PROXY_UPSTREAM_TIMEOUT).",
        decision="upstream_error",
    )


class Forwarder:
    """Sends requests to the upstream base URL over one shared connection pool.

    Use as an async context manager: the pool opens on entry and closes on exit.
    """

    def __init__(
        self, *, base_url: str, max_body: int, timeout: float, max_header_bytes: int = 32_768
    ) -> None:
        self._base_url = base_url
        self._max_body = max_body
        self._max_header_bytes = max_header_bytes
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Forwarder:
        self._session = aiohttp.ClientSession(
            # No pool limit: a call waiting for a pooled connection can be overtaken by newer calls
            # again and again, so a limit starved some callers for seconds under bursts.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            # Per phase, not in total: a long download is fine as long as bytes keep coming.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._timeout, sock_read=self._timeout
            ),
            # Bodies pass through as bytes; no cookies are kept between callers; no proxy or
            # .netrc variables may redirect or re-authenticate our calls.
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def __call__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        exchange: Exchange,
        authorization: str,
    ) -> None:
        """Forward one request to `path` below the base URL with the `authorization` header.

        Raises `ProxyError` when it fails before the response started.
        """
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if sum(len(name) + len(value) + 4 for name, value in headers) > self._max_header_bytes:
            raise _headers_too_large(self._max_header_bytes)
        length = _content_length(headers)
        if length is not None and length > self._max_body:
            raise _too_large(self._max_body)
        chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
        has_body = chunked or bool(length)
        url = self._base_url + path
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        watch = _DisconnectWatch(receive)
        body = (
            _RequestBody(receive, self._max_body, exchange, watch, self._timeout)
            if has_body
            else None
        )
        if body is None:
            watch.start()
        outgoing = request_headers(headers, authorization, has_body, exchange.request_id)
        try:
            await self._exchange(scope["method"], url, outgoing, body, send, exchange, watch)
        except (asyncio.CancelledError, ClientDisconnected) as gone:
            if not watch.disconnected:
                raise
            if isinstance(gone, asyncio.CancelledError):
                # Our own watch cancelled us; nobody else asked this task to stop.
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            # The client is gone, which is not a server failure.
            exchange.status = exchange.status or _CLIENT_CLOSED
            exchange.decision = "upstream_error"
            exchange.error_code = "CLIENT_DISCONNECTED"
        finally:
            watch.stop()

    async def probe(self, authorization: str) -> tuple[int, str | None]:
        """One small read call to InvoisX: its status and error code (status 0: unreachable)."""
        assert self._session is not None, "use the Forwarder as an async context manager"
        headers = {"accept": "application/json", "authorization": authorization}
        headers |= {"user-agent": _USER_AGENT}
        try:
            async with self._session.get(
                self._base_url + "/buyers?per_page=1", headers=headers, allow_redirects=False
            ) as response:
                body = await response.content.read(_ERROR_PEEK_BYTES)
                content_type = response.headers.get("content-type", "")
                return response.status, _error_code(response.status, content_type, body)
        except (aiohttp.ClientError, TimeoutError):
            return 0, None

    async def _exchange(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: _RequestBody | None,
        send: Send,
        exchange: Exchange,
        watch: _DisconnectWatch,
    ) -> None:
        started = time.perf_counter()
        try:
            response = await self._send(method, url, headers, body)
        except aiohttp.ConnectionTimeoutError as error:
            raise _unavailable() from error
        except TimeoutError as error:
            raise _timed_out() from error
        except aiohttp.ClientError as error:
            if body is not None and body.error is not None:
                raise body.error from None
            raise _unavailable() from error
        exchange.upstream_ms = (time.perf_counter() - started) * 1000
        try:
            await self._relay(response, send, exchange, watch)
        finally:
            response.release()

    async def _send(
        self, method: str, url: str, headers: list[tuple[str, str]], body: _RequestBody | None
    ) -> aiohttp.ClientResponse:
        assert self._session is not None, "use the Forwarder as an async context manager"
        request = self._session.request(
            method,
            URL(url, encoded=True),  # forward the path and query exactly as received
            headers=headers,
            data=body,
            allow_redirects=False,
        )
        if body is None:
            return await request
        async with asyncio.timeout(None) as deadline:
            body.deadline = deadline
            return await request

    async def _relay(
        self,
        response: aiohttp.ClientResponse,
        send: Send,
        exchange: Exchange,
        watch: _DisconnectWatch,
    ) -> None:
        exchange.status = response.status
        exchange.ratelimit_remaining = response.headers.get("x-ratelimit-remaining")
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": response_headers(list(response.raw_headers), exchange.request_id),
            }
        )
        peek = bytearray() if response.status >= 400 else None
        body = response.content
        last = body.at_eof()
        if last:  # no body at all (204, HEAD, an empty 200)
            watch.stop()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        try:
            while not last:
                chunk = await body.readany()
                exchange.bytes_out += len(chunk)
                if peek is not None and len(peek) < _ERROR_PEEK_BYTES:
                    peek += chunk
                # Marking the final chunk as such saves the server a separate empty message.
                last = body.at_eof()
                if last:
                    # Once the last chunk is out the server reports a disconnect; not ours.
                    watch.stop()
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
        except (aiohttp.ClientError, TimeoutError):
            # The status line is already out: closing the connection without the final chunk
            # is the only honest way left to tell the client the body is incomplete.
            exchange.decision = "upstream_error"
            exchange.error_code = "UPSTREAM_UNAVAILABLE"
            return

        if peek is not None and not response.headers.get("content-encoding"):
            content_type = response.headers.get("content-type", "")
            exchange.error_code = _error_code(response.status, content_type, bytes(peek))
