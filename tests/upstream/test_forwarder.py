"""Forwarding through real sockets: bodies byte-exact, retries, timeouts, the pool's limit,
clients that leave or stall, and upstream failures as 502 or 504."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from proxy.server.serving import bind, serving_in_thread
from tests.conftest import (
    Recorded,
    Recorder,
    Reply,
    RunningProxy,
    free_port,
    loopback_config,
    raw_server,
    run_server,
)
from tests.wire import assert_proxy_error, parse_response

Upstream = tuple[Recorder, str]


def test_no_content_passes_through(proxy: RunningProxy, recorder: Upstream) -> None:
    stand_in, _ = recorder
    stand_in.reply = lambda request: Reply(status=204, headers=[], chunks=())
    response = httpx.delete(f"{proxy.url}/api/v1/buyers/9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d")
    assert response.status_code == 204
    assert response.content == b""
    assert stand_in.requests[-1].method == "DELETE"


def test_gzip_body_is_passed_as_is(proxy: RunningProxy, recorder: Upstream) -> None:
    stand_in, _ = recorder
    payload = b'{"success":true,"data":[' + b'{"name":"Acme"},' * 500 + b"{}]}"
    compressed = gzip.compress(payload)
    stand_in.reply = lambda request: Reply(
        headers=[(b"content-type", b"application/json"), (b"content-encoding", b"gzip")],
        chunks=[compressed],
    )
    with httpx.Client() as client, client.stream("GET", f"{proxy.url}/api/v1/buyers") as response:
        raw = b"".join(response.iter_raw())
        assert response.headers["content-encoding"] == "gzip"
    assert raw == compressed
    assert gzip.decompress(raw) == payload


def test_several_megabytes_both_ways_byte_exact(proxy: RunningProxy, recorder: Upstream) -> None:
    stand_in, _ = recorder
    upload = os.urandom(6 * 1024 * 1024)
    download = os.urandom(7 * 1024 * 1024)
    stand_in.reply = lambda request: Reply(
        headers=[(b"content-type", b"application/octet-stream")],
        chunks=[download[i : i + 65536] for i in range(0, len(download), 65536)],
    )

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(upload), 100_000):
            yield upload[i : i + 100_000]

    response = httpx.post(
        f"{proxy.url}/api/v1/invoices/import",
        content=chunks(),
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert response.status_code == 200
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(download).digest()
    assert hashlib.sha256(stand_in.requests[-1].body).digest() == hashlib.sha256(upload).digest()
    line = proxy.last_audit()
    assert (line["bytes_in"], line["bytes_out"]) == (len(upload), len(download))


def test_upstream_down_is_502(start_proxy: object) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}/api/v1")  # type: ignore[operator]
    response = httpx.get(f"{proxy.url}/api/v1/buyers")
    assert response.status_code == 502
    assert response.json() == {
        "success": False,
        "message": "InvoisX could not be reached: the connection was refused.",
        "error_code": "UPSTREAM_UNAVAILABLE",
    }
    assert response.headers["x-request-id"]
    assert proxy.last_audit()["decision"] == "upstream_error"


def test_slow_upstream_is_504(recorder: Upstream, start_proxy: object) -> None:
    stand_in, upstream = recorder
    stand_in.reply = lambda request: Reply(delay=2.0)
    proxy = start_proxy(upstream, upstream_timeout=0.3)  # type: ignore[operator]
    started = time.monotonic()
    response = httpx.get(f"{proxy.url}/api/v1/buyers")
    assert time.monotonic() - started < 1.5
    assert response.status_code == 504
    assert response.json()["error_code"] == "UPSTREAM_TIMEOUT"
    line = proxy.last_audit()
    assert (line["status"], line["decision"]) == (504, "upstream_error")


def test_client_disconnect_cancels_upstream_request(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    stand_in, _ = recorder
    stand_in.reply = lambda request: Reply(delay=5.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{proxy.url}/api/v1/buyers", timeout=0.3)
    deadline = time.monotonic() + 3
    while stand_in.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stand_in.disconnects == 1
    line = proxy.last_audit()
    assert (line["status"], line["error_code"]) == (499, "CLIENT_DISCONNECTED")


def test_upstream_reset_mid_body_closes_client_connection(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    stand_in, _ = recorder

    def broken() -> Iterator[bytes]:
        yield b'{"success":true,'
        raise RuntimeError("stand-in dies mid-body")

    stand_in.reply = lambda request: Reply(
        headers=[(b"content-type", b"application/json"), (b"content-length", b"1000")],
        chunks=broken(),
    )
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{proxy.url}/api/v1/buyers")
    line = proxy.last_audit()
    assert (line["status"], line["decision"]) == (200, "upstream_error")
    assert httpx.get(f"{proxy.url}/healthz").status_code == 200


def test_upstream_tls_certificate_is_verified(
    tmp_path: Path, start_proxy: Callable[..., RunningProxy]
) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    self_signed = "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 -addext"
    self_signed += " subjectAltName=IP:127.0.0.1"
    subprocess.run(
        ["openssl", *self_signed.split(), "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    stand_in = Recorder()
    config = loopback_config(stand_in)
    config.ssl_keyfile, config.ssl_certfile = str(key), str(cert)
    with run_server(config) as url:
        proxy = start_proxy(url.replace("http://", "https://") + "/api/v1")
        response = httpx.get(f"{proxy.url}/api/v1/buyers")
    # A self-signed certificate is not trusted, so nothing (and no token) reaches the server.
    assert response.status_code == 502
    assert response.json()["error_code"] == "UPSTREAM_UNAVAILABLE"
    assert stand_in.requests == []


def test_upstream_that_stops_reading_an_upload_times_out(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        proxy = start_proxy(f"http://127.0.0.1:{port}/api/v1", upstream_timeout=0.5)
        started = time.monotonic()
        response = httpx.post(f"{proxy.url}/api/v1/buyers", content=b"x" * 8_000_000, timeout=10)
        elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json() == {
        "success": False,
        "message": "InvoisX stopped taking the request body for 0.5 s "
        "(INVOISX_PROXY_UPSTREAM_TIMEOUT).",
        "error_code": "UPSTREAM_TIMEOUT",
    }
    assert elapsed < 5
    assert proxy.last_audit()["decision"] == "upstream_error"


def _answers(*statuses: int, retry_after: str | None = None) -> Callable[[Recorded], Reply]:
    """A stand-in reply that walks through `statuses`, then answers 200."""
    remaining = iter(statuses)

    def reply(request: Recorded) -> Reply:
        status = next(remaining, 200)
        headers = [(b"content-type", b"application/json")]
        if retry_after is not None and status != 200:
            headers.append((b"retry-after", retry_after.encode()))
        return Reply(status, headers=headers, chunks=(f'{{"status":{status}}}'.encode(),))

    return reply


def test_get_is_retried_after_503_and_429(recorder: Upstream, start_proxy: object) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _answers(503, 429)
    proxy = start_proxy(upstream)  # type: ignore[operator]
    response = httpx.get(f"{proxy.url}/api/v1/buyers")
    assert (response.status_code, response.json()) == (200, {"status": 200})
    assert len(stand_in.requests) == 3
    line = proxy.audit_of(response)
    assert (line["retries"], line["status"], line["decision"]) == (2, 200, "forwarded")
    assert line["upstream_429s"] == 1


def test_retries_stop_at_the_limit(recorder: Upstream, start_proxy: object) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _answers(503, 503, 503, 503)
    proxy = start_proxy(upstream, retry_max=1)  # type: ignore[operator]
    response = httpx.get(f"{proxy.url}/api/v1/buyers")
    assert response.status_code == 503
    assert len(stand_in.requests) == 2
    assert proxy.audit_of(response)["upstream_429s"] == 0


def test_retry_after_is_honoured_within_the_timeout(
    recorder: Upstream, start_proxy: object
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _answers(429, retry_after="1")
    proxy = start_proxy(upstream, upstream_timeout=5)  # type: ignore[operator]
    started = time.monotonic()
    assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 200
    assert 1.0 <= time.monotonic() - started < 3
    # A Retry-After past the timeout is not waited for: the 429 goes back to the client.
    stand_in.reply = _answers(429, retry_after="60")
    started = time.monotonic()
    limited = httpx.get(f"{proxy.url}/api/v1/buyers")
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "60"
    assert time.monotonic() - started < 1
    assert proxy.audit_of(limited)["upstream_429s"] == 1


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_unsafe_methods_are_never_retried(
    method: str, recorder: Upstream, start_proxy: object
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _answers(503)
    proxy = start_proxy(upstream)  # type: ignore[operator]
    response = httpx.request(method, f"{proxy.url}/api/v1/invoices/i1", content=b"{}")
    assert response.status_code == 503
    assert len(stand_in.requests) == 1


def test_get_retried_when_the_connection_failed_before_sending(start_proxy: object) -> None:
    # Nothing listens at first; a stand-in appears on that port while the proxy backs off.
    port = free_port()
    stand_in = Recorder()
    upstream = f"http://127.0.0.1:{port}/api/v1"
    # Backing off 0.25, 0.5, 1, 2 s: room for a slow machine to start the stand-in.
    proxy = start_proxy(upstream, upstream_timeout=10, retry_max=4)  # type: ignore[operator]
    ready = threading.Event()

    def serve_soon() -> None:
        time.sleep(0.1)
        config = uvicorn.Config(stand_in, log_config=None, lifespan="off")
        with serving_in_thread(config, bind("127.0.0.1", port)):
            ready.set()
            time.sleep(2)

    server = threading.Thread(target=serve_soon)
    server.start()
    try:
        response = httpx.get(f"{proxy.url}/api/v1/buyers")
    finally:
        server.join()
    assert ready.is_set()
    assert response.status_code == 200
    assert proxy.audit_of(response)["retries"] >= 1
    assert len(stand_in.requests) == 1


class _Streaming:
    """A stand-in that counts the calls it serves at once and streams each answer slowly."""

    def __init__(self, chunks: int, pause: float, size: int = 1) -> None:
        self.chunks = chunks
        self.pause = pause
        self.chunk = b"." * size
        self.serving = 0
        self.peak = 0
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        self.serving += 1
        self.peak = max(self.peak, self.serving)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(self.chunks):
                await asyncio.sleep(self.pause)
                await send({"type": "http.response.body", "body": self.chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            self.serving -= 1


@contextmanager
def _one_call_in_flight(client: httpx.Client, url: str, stand_in: _Streaming) -> Iterator[None]:
    """A call from a background thread, from when the stand-in serves it until it ends."""
    holder = threading.Thread(target=client.get, args=(url,))
    holder.start()
    while stand_in.serving == 0:
        time.sleep(0.01)
    try:
        yield
    finally:
        holder.join()


def test_calls_beyond_max_upstream_connections_wait_for_one(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    stand_in = _Streaming(chunks=4, pause=0.05)
    with run_server(loopback_config(stand_in)) as url:
        proxy = start_proxy(f"{url}/api/v1", max_upstream_connections=2)

        async def calls() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as client:
                return await asyncio.gather(
                    *(client.get(f"{proxy.url}/api/v1/buyers") for _ in range(8))
                )

        responses = asyncio.run(calls())
    assert [(r.status_code, r.content) for r in responses] == [(200, b"....")] * 8
    assert stand_in.peak == 2


def test_no_free_connection_within_the_timeout_is_502(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    # The first call keeps its connection busy for about a second, bytes flowing all along.
    stand_in = _Streaming(chunks=10, pause=0.1)
    with run_server(loopback_config(stand_in)) as url:
        proxy = start_proxy(f"{url}/api/v1", max_upstream_connections=1, upstream_timeout=0.3)
        with httpx.Client(timeout=10) as client:
            with _one_call_in_flight(client, f"{proxy.url}/api/v1/buyers", stand_in):
                started = time.monotonic()
                refused = client.get(f"{proxy.url}/api/v1/invoices")
                waited = time.monotonic() - started
            after = client.get(f"{proxy.url}/api/v1/buyers")
    assert refused.status_code == 502
    assert refused.json()["error_code"] == "UPSTREAM_UNAVAILABLE"
    assert 0.25 <= waited < 0.9
    assert proxy.audit_of(refused)["decision"] == "upstream_error"
    # The connection the first call held is free again.
    assert (after.status_code, after.content) == (200, b"." * 10)


def test_a_client_leaving_while_its_call_waits_for_a_connection_frees_its_turn(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    stand_in = _Streaming(chunks=20, pause=0.1)  # holds the only connection for about 2 s
    with run_server(loopback_config(stand_in)) as url:
        proxy = start_proxy(f"{url}/api/v1", max_upstream_connections=1, upstream_timeout=5)
        with httpx.Client(timeout=10) as client:
            with (
                _one_call_in_flight(client, f"{proxy.url}/api/v1/buyers", stand_in),
                pytest.raises(httpx.ReadTimeout),
            ):
                httpx.get(
                    f"{proxy.url}/api/v1/invoices", headers={"X-Request-ID": "gone"}, timeout=0.3
                )
            after = client.get(f"{proxy.url}/api/v1/buyers")
    left = next(line for line in proxy.audit_lines(at_least=3) if line["request_id"] == "gone")
    assert (left["status"], left["error_code"], left["upstream_ms"]) == (
        499,
        "CLIENT_DISCONNECTED",
        None,
    )
    assert after.status_code == 200
    assert (stand_in.calls, stand_in.peak) == (2, 1)  # the call that was left never went out


def _address(host_port: str) -> tuple[str, int]:
    host, port = host_port.split(":")
    return host, int(port)


def _stuck_client(proxy: RunningProxy, request: bytes) -> socket.socket:
    """A client that sends `request` and then neither sends nor reads anything more."""
    host, port = proxy.url.removeprefix("http://").split(":")
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.settimeout(10)
    stuck.connect((host, int(port)))
    stuck.sendall(request)
    return stuck


def test_a_stalled_upload_gets_408_and_is_never_completed_upstream(
    recorder: Upstream, start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    proxy = start_proxy(upstream, max_upstream_connections=1, client_timeout=1)
    # One byte of a promised hundred, then nothing.
    head = b"POST /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"
    with _stuck_client(proxy, head) as stuck:
        time.sleep(0.3)
        started = time.monotonic()
        response = httpx.get(f"{proxy.url}/api/v1/invoices", timeout=10)
        elapsed = time.monotonic() - started
        answer = parse_response(stuck.recv(65536))
    # The only socket to InvoisX was freed when the stalled call was cut off, after 1 s.
    assert response.status_code == 200
    assert 0.5 < elapsed < 3
    body = assert_proxy_error(answer)
    assert body is not None and body["error_code"] == "CLIENT_TIMEOUT"
    assert [request.method for request in stand_in.requests] == ["GET"]
    deadline = time.monotonic() + 5
    while stand_in.incomplete < 1:  # the half-sent upload was abandoned, not completed
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_clients_that_stop_reading_hold_no_more_sockets_than_the_limit(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    stand_in = _Streaming(chunks=8, pause=0, size=1_000_000)  # 8 MB each, as fast as it goes
    with run_server(loopback_config(stand_in)) as url, _peak_sockets_to(url) as peak:
        proxy = start_proxy(f"{url}/api/v1", max_upstream_connections=2, client_timeout=1)
        get = b"GET /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        stuck = [_stuck_client(proxy, get) for _ in range(5)]
        try:
            time.sleep(0.3)
            response = httpx.get(f"{proxy.url}/api/v1/invoices", timeout=30)
            deadline = time.monotonic() + 10
            while len(cut := _audited(proxy, "/api/v1/buyers")) < 5:  # the last ones still go
                assert time.monotonic() < deadline, cut
                time.sleep(0.05)
        finally:
            for client in stuck:
                client.close()
    assert (response.status_code, len(response.content)) == (200, 8_000_000)
    assert 1 <= peak[0] <= 2
    assert [(line["status"], line["error_code"]) for line in cut] == [(200, "CLIENT_TIMEOUT")] * 5


@contextmanager
def _peak_sockets_to(url: str) -> Iterator[list[int]]:
    """The most connections open to `url`'s port at once, sampled from the kernel's table
    (/proc/net/tcp) while inside; the stand-in's own view lags behind aborted ones."""
    port = f"{int(url.rsplit(':', 1)[1]):04X}"
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
            # Columns: slot, local address, remote address, state (01: established), ...
            open_now = sum(
                1 for row in rows if row.split()[2].endswith(":" + port) and row.split()[3] == "01"
            )
            peak[0] = max(peak[0], open_now)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


def _audited(proxy: RunningProxy, path: str) -> list[dict[str, object]]:
    return [line for line in proxy.audit_lines() if line["path"] == path]


def test_a_retry_gets_the_whole_timeout_on_its_new_connection(start_proxy: object) -> None:
    answers = iter(
        [
            (
                0.4,
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0"
                b"\r\nConnection: close\r\n\r\n",
            ),
            (
                0.8,
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
            ),
        ]
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        delay, answer = next(answers)
        await asyncio.sleep(delay)
        writer.write(answer)
        await writer.drain()
        writer.close()

    with raw_server(handle) as port:
        proxy = start_proxy(  # type: ignore[operator]
            f"http://127.0.0.1:{port}/api/v1", upstream_timeout=1.0, retry_max=2
        )
        response = httpx.get(f"{proxy.url}/api/v1/buyers", timeout=10)
    # The retry waited 0.8 s for its answer: within the 1 s timeout, counted afresh.
    assert (response.status_code, response.content) == (200, b"{}")
    assert proxy.audit_of(response)["retries"] == 1


def test_an_absurd_number_in_invoisx_headers_costs_no_connection_turn(
    start_proxy: object,
) -> None:
    absurd = b"9" * 400  # would overflow the rate limiter's arithmetic

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(
                    b"HTTP/1.1 200 OK\r\nX-RateLimit-Remaining: 0\r\nX-RateLimit-Reset: "
                    + absurd
                    + b"\r\nContent-Length: 2\r\n\r\n{}"
                )
                await writer.drain()

    with raw_server(handle) as port:
        proxy = start_proxy(  # type: ignore[operator]
            f"http://127.0.0.1:{port}/api/v1",
            max_upstream_connections=1,
            upstream_timeout=1,
            rate_limit_per_minute=6000,
        )
        statuses = [httpx.get(f"{proxy.url}/api/v1/buyers").status_code for _ in range(3)]
    # Each answer passed through; none left the one connection's turn taken.
    assert statuses == [200, 200, 200]


def test_204_and_304_with_content_length_pass_on_and_keep_the_connection(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    # A 304's Content-Length is the resource's (legal); neither answer has a body.
    answers = {
        b"not-modified": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n',
        b"no-content": b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        b"ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    }

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(answers[head.split(b" ", 2)[1].rsplit(b"/", 1)[1]])
                await writer.drain()

    with raw_server(handle) as upstream_port:
        proxy = start_proxy(f"http://127.0.0.1:{upstream_port}/api/v1")
        host, port = proxy.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as client:
            client.sendall(
                b"".join(
                    b"GET /api/v1/buyers/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: %s\r\n"
                    % (name, name)
                    + (b"Connection: close\r\n\r\n" if name == b"ok" else b"\r\n")
                    for name in answers
                )
            )
            raw = b""
            while received := client.recv(65536):
                raw += received
    heads = raw.split(b"\r\n\r\n")
    assert [head.split(b"\r\n", 1)[0] for head in heads[:3]] == [
        b"HTTP/1.1 304 Not Modified",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 200 OK",
    ]
    assert b'etag: "v1"' in heads[0]
    assert b"content-length" not in heads[0] + heads[1]
    assert heads[3:] == [b"{}"]
    outcomes = {
        line["request_id"]: (line["status"], line["decision"])
        for line in proxy.audit_lines(at_least=3)
    }
    assert outcomes == {
        "not-modified": (304, "forwarded"),
        "no-content": (204, "forwarded"),
        "ok": (200, "forwarded"),
    }


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_a_slow_but_steady_client_is_not_cut_off(
    direction: str, recorder: Upstream, start_proxy: Callable[..., RunningProxy]
) -> None:
    """The client timeout is for stalls: a transfer that keeps moving may take longer."""
    stand_in, upstream = recorder
    size = 2_000_000
    stand_in.reply = lambda request: Reply(chunks=[b"x" * size] if direction == "download" else ())
    proxy = start_proxy(upstream, client_timeout=0.5)
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        conn.settimeout(10)
        conn.connect((host, int(port)))
        if direction == "upload":
            conn.sendall(
                b"POST /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % size
            )
            for _ in range(size // 100_000):  # 100 KB every 0.1 s: 2 s in all
                conn.sendall(b"y" * 100_000)
                time.sleep(0.1)
        else:
            conn.sendall(
                b"GET /api/v1/big HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
        received = b""
        while chunk := conn.recv(16384):
            received += chunk
            if direction == "download":
                time.sleep(0.01)  # about 1.6 MB/s: longer than the timeout, never stalled
    response = parse_response(received)
    assert response.status == 200 and response.complete
    assert proxy.last_audit()["error_code"] is None
    if direction == "upload":
        assert len(stand_in.requests[-1].body) == size
    else:
        assert len(response.body) == size
