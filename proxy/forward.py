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
from proxy.ratelimit import RateLimiter

__all__ = [
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
# The response headers must be in within this many upstream timeouts of the request.
_HEADERS_WITHIN = 3
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
    waited_ms: float = 0.0
    retries: int = 0

    def client_gone(self) -> None:
        """Record that the client left early: not a server failure, so no error response."""
        self.status = self.status or _CLIENT_CLOSED
        self.decision = "upstream_error"
        self.error_code = "CLIENT_DISCONNECTED"


class ClientDisconnected(Exception):
    """The client went away before the exchange finished."""


class _DisconnectWatch:
    """Watches a slow call: cancels it when its client disconnects, so InvoisX work stops too,
    or when InvoisX's response headers are overdue.

    It may only listen once the request body has been read: before that, `receive()` belongs
    to the body stream. Listening takes a task, so it begins only when an exchange outlasts
    `_WATCH_AFTER`: a quick answer is over before a disconnect could save much work. The
    header deadline is armed at that moment too, so quick calls pay for no extra timer.
    """

    def __init__(self, receive: Receive, headers_within: float, *, listen: bool = True) -> None:
        self._receive = receive
        self._headers_within = headers_within
        self._listen_for_disconnect = listen
        # The request body is streamed from aiohttp's writer task, so remember the task that
        # handles the request now: that is the one to cancel.
        self._owner = asyncio.current_task()
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self.disconnected = False
        self.headers_in = False
        self.overdue = False

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(_WATCH_AFTER, self._listen)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.headers_received()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def headers_received(self) -> None:
        self.headers_in = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_overdue(self) -> None:
        assert self._owner is not None
        self._deadline = None
        self.overdue = True
        self._owner.cancel()

    def _listen(self) -> None:
        assert self._owner is not None
        self._timer = None
        if self._listen_for_disconnect:
            self._task = asyncio.create_task(self._watch(self._owner))
        if not self.headers_in:
            # aiohttp's read timeout catches a silent InvoisX but restarts with every byte;
            # this stops one that trickles its headers, with room for a busy machine.
            self._deadline = asyncio.get_running_loop().call_later(
                max(0.0, self._headers_within - _WATCH_AFTER), self._headers_overdue
            )

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
        # forever, and its read timeout restarts with every header byte. The sender sets
        # this deadline; each chunk arms it, and the last one bounds the wait for an answer.
        self.deadline: asyncio.Timeout | None = None

    def _arm(self, seconds: float | None) -> None:
        if self.deadline is not None:
            when = None if seconds is None else asyncio.get_running_loop().time() + seconds
            self.deadline.reschedule(when)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            # Waiting for the client is not InvoisX's doing: no deadline meanwhile.
            self._arm(None)
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
            # InvoisX must take this chunk in time.
            self._arm(self._stall_timeout)
            if not message.get("more_body", False):
                self._watch.start()
                if chunk:
                    yield chunk
                # From here the watch bounds the wait for the answer, as for other calls.
                self._arm(None)
                return
            if chunk:
                yield chunk


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
    return chunked or bool(_content_length(headers))


async def read_body(receive: Receive, limit: int, exchange: Exchange) -> bytes:
    """The whole request body, for calls that must see it before forwarding (idempotency)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        body += message.get("body", b"")
        exchange.bytes_in = len(body)
        if len(body) > limit:
            raise _too_large(limit)
        if not message.get("more_body", False):
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


@dataclass(frozen=True, slots=True)
class _Attempts:
    """What each attempt at one call sends.

    Only a GET or HEAD without a body is retried (nothing else can be assumed harmless twice),
    and only when InvoisX answered 429 or 503 or the connection failed before a byte was sent.
    """

    method: str
    url: str
    headers: list[tuple[str, str]]
    body: _RequestBody | bytes | None
    client_per_minute: int | None

    @property
    def retryable(self) -> bool:
        return self.method in _RETRYABLE_METHODS and self.body is None


_RETRYABLE_METHODS = frozenset({"GET", "HEAD"})
_RETRYABLE_STATUSES = frozenset({429, 503})
# Failures to connect: the request never left, so even a retry cannot repeat it.
_NOTHING_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def _backoff(retries: int) -> float:
    return 0.25 * 2**retries


def _retry_delay(response: aiohttp.ClientResponse, retries: int) -> float | None:
    """Seconds to wait before retrying `response`'s call, or None when it is final."""
    if response.status not in _RETRYABLE_STATUSES:
        return None
    retry_after = response.headers.get("retry-after", "")
    return float(retry_after) if retry_after.isdigit() else _backoff(retries)


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
        self,
        *,
        base_url: str,
        max_body: int,
        timeout: float,
        max_header_bytes: int = 32_768,
        limiter: RateLimiter | None = None,
        retry_max: int = 0,
    ) -> None:
        self._base_url = base_url
        self._max_body = max_body
        self._max_header_bytes = max_header_bytes
        self._limiter = limiter
        self._retry_max = retry_max
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
        *,
        client_per_minute: int | None = None,
        preread: bytes | None = None,
        capture: Capture | None = None,
    ) -> None:
        """Forward one request to `path` below the base URL with the `authorization` header.

        `preread` is the request body when the caller already read it (`read_body`, after
        `check_request_size`); `capture` keeps a copy of the response. Raises `ProxyError` when
        it fails before the response started.
        """
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if preread is None:  # a caller that read the body has checked the sizes already
            self.check_request_size(headers)
        url = self._base_url + path
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        # A call whose answer is kept (idempotency) runs to the end even if its client leaves:
        # the answer is what the client's retry will get.
        watch = _DisconnectWatch(receive, _HEADERS_WITHIN * self._timeout, listen=capture is None)
        body: _RequestBody | bytes | None = preread or None
        if preread is None and _has_body(headers):
            body = _RequestBody(receive, self._max_body, exchange, watch, self._timeout)
        if not isinstance(body, _RequestBody):
            watch.start()
        outgoing = request_headers(headers, authorization, body is not None, exchange.request_id)
        attempt = _Attempts(
            method=scope["method"],
            url=url,
            headers=outgoing,
            body=body,
            client_per_minute=client_per_minute,
        )
        try:
            await self._exchange(attempt, send, exchange, watch, capture)
        except (asyncio.CancelledError, ClientDisconnected) as gone:
            if watch.overdue and isinstance(gone, asyncio.CancelledError):
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                if not exchange.status:
                    raise _timed_out() from None
                # The headers came in as the deadline fired: the response has started.
                exchange.decision = "upstream_error"
                exchange.error_code = "UPSTREAM_TIMEOUT"
                return
            if not watch.disconnected:
                raise
            if isinstance(gone, asyncio.CancelledError):
                # Our own watch cancelled us; nobody else asked this task to stop.
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            exchange.client_gone()
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

    def check_request_size(self, headers: list[tuple[bytes, bytes]]) -> None:
        """431 for headers over the limit, 413 for a declared body over it."""
        if sum(len(name) + len(value) + 4 for name, value in headers) > self._max_header_bytes:
            raise _headers_too_large(self._max_header_bytes)
        length = _content_length(headers)
        if length is not None and length > self._max_body:
            raise _too_large(self._max_body)

    async def _exchange(
        self,
        attempt: _Attempts,
        send: Send,
        exchange: Exchange,
        watch: _DisconnectWatch,
        capture: Capture | None,
    ) -> None:
        started = time.perf_counter()
        response = await self._send_with_retries(attempt, exchange, started + self._timeout)
        watch.headers_received()
        exchange.upstream_ms = (time.perf_counter() - started) * 1000 - exchange.waited_ms
        try:
            await self._relay(response, send, exchange, watch, capture)
        finally:
            response.release()

    async def _send_with_retries(
        self, attempt: _Attempts, exchange: Exchange, deadline: float
    ) -> aiohttp.ClientResponse:
        """Send, retrying only what cannot have taken effect twice (see `_Attempts`)."""
        retries_left = self._retry_max if attempt.retryable else 0
        while True:
            if self._limiter is not None:
                waited = await self._limiter.acquire(exchange.client, attempt.client_per_minute)
                exchange.waited_ms += waited * 1000
            try:
                response = await self._send(attempt)
            except _NOTHING_SENT as error:
                delay = _backoff(exchange.retries)
                if not retries_left or time.perf_counter() + delay >= deadline:
                    raise _unavailable() from error
            except TimeoutError as error:
                raise _timed_out() from error
            except aiohttp.ClientError as error:
                if isinstance(attempt.body, _RequestBody) and attempt.body.error is not None:
                    raise attempt.body.error from None
                raise _unavailable() from error
            else:
                if self._limiter is not None:
                    self._limiter.learn(response.status, response.headers)
                delay = _retry_delay(response, exchange.retries)
                if delay is None or not retries_left or time.perf_counter() + delay >= deadline:
                    return response
                response.release()
            retries_left -= 1
            exchange.retries += 1
            await asyncio.sleep(delay)

    async def _send(self, attempt: _Attempts) -> aiohttp.ClientResponse:
        assert self._session is not None, "use the Forwarder as an async context manager"
        request = self._session.request(
            attempt.method,
            URL(attempt.url, encoded=True),  # forward the path and query exactly as received
            headers=attempt.headers,
            data=attempt.body,
            allow_redirects=False,
        )
        if not isinstance(attempt.body, _RequestBody):
            return await request
        async with asyncio.timeout(None) as deadline:
            attempt.body.deadline = deadline
            return await request

    async def _relay(
        self,
        response: aiohttp.ClientResponse,
        send: Send,
        exchange: Exchange,
        watch: _DisconnectWatch,
        capture: Capture | None,
    ) -> None:
        exchange.status = response.status
        exchange.ratelimit_remaining = response.headers.get("x-ratelimit-remaining")
        headers = response_headers(list(response.raw_headers), exchange.request_id)
        if capture is not None:
            capture.start(response.status, headers)
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
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
                if capture is not None:
                    capture.add(chunk)
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
        if capture is not None:
            capture.complete = True

        if peek is not None and not response.headers.get("content-encoding"):
            content_type = response.headers.get("content-type", "")
            exchange.error_code = _error_code(response.status, content_type, bytes(peek))
