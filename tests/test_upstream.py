"""The connections to InvoisX, driven directly against scripted loopback servers.

Each test runs its own event loop with a raw asyncio TCP server that answers with the bytes
the test wants, so framing, reuse and the pool's queue are checked below the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from proxy.upstream.http11 import (
    Broken,
    Connection,
    Dropped,
    Origin,
    Pool,
    Stalled,
    Unreachable,
    connect_failure,
)
from tests.conftest import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
GET = b"GET /api/v1/buyers HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def closing(handler: Handler) -> Handler:
    """`handler`, closing its connection when it returns or is cancelled."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    return handle


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Pool]:
    """A scripted server on a free port, and a pool of at most 2 connections to it."""
    server = await asyncio.start_server(closing(handler), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool(
        Origin.from_url(f"http://127.0.0.1:{port}/api/v1"),
        limit=2,
        connect_timeout=0.5,
        idle_timeout=15,
    )
    pool.open(asyncio.get_running_loop())
    ticking = asyncio.create_task(_tick(pool))
    try:
        yield pool
    finally:
        ticking.cancel()
        pool.close()
        server.close()
        await asyncio.sleep(0.02)  # the handlers see the pool's connections close, and end


async def _tick(pool: Pool) -> None:
    """What the forward stage does for its pool: `expire` every few hundredths of a second."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0.02)
        pool.expire(loop.time())


def answering(*answers: bytes, then_close: bool = False) -> Handler:
    """A handler that reads each request head and writes the next answer."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            for answer in answers:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
            if not then_close:
                await reader.read()  # until the client closes

    return handle


async def _get_on_another(pool: Pool, first: Connection) -> None:
    """A GET that must get a new connection, not `first`, and its usual answer."""
    second, body = await _get(pool)
    assert second is not first
    assert body == b"{}"
    pool.release(second)


async def _get(pool: Pool, *, head_only: bool = False) -> tuple[Connection, bytes]:
    connection = await pool.acquire(head_only=head_only)
    connection.send(GET, last=True)
    await connection.response_head()
    body = connection.take()
    while not connection.complete:
        await connection.more()
        body += connection.take()
    return connection, body


def test_a_clean_exchange_leaves_its_connection_for_the_next() -> None:
    async def main() -> None:
        async with serving(answering(OK, OK)) as pool:
            first, body = await _get(pool)
            assert (first.status, body) == (200, b"{}")
            assert (b"content-type", b"application/json") in first.headers  # names lowercased
            pool.release(first)
            second, _ = await _get(pool)
            assert second is first
            pool.release(second)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("answer", "head_only"),
    [
        (OK, True),  # HEAD: the parser would take the next bytes for a body
        (OK + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad", False),  # a second answer
        (OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), False),
    ],
    ids=["head", "extra-answer", "connection-close"],
)
def test_connections_are_not_reused_after_an_unclean_end(answer: bytes, head_only: bool) -> None:
    async def main() -> None:
        async with serving(answering(answer, OK)) as pool:
            first, body = await _get(pool, head_only=head_only)
            assert body == (b"" if head_only else b"{}")
            assert not first.reusable
            pool.release(first)
            await _get_on_another(pool, first)

    asyncio.run(main())


def test_an_answer_without_framing_ends_when_the_connection_closes() -> None:
    unframed = b"HTTP/1.1 200 OK\r\n\r\nuntil close"

    async def main() -> None:
        async with serving(answering(unframed, then_close=True)) as pool:
            connection, body = await _get(pool)
            assert body == b"until close"
            assert not connection.reusable
            pool.release(connection)

    asyncio.run(main())


def test_interim_answers_are_skipped() -> None:
    async def main() -> None:
        async with serving(answering(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as pool:
            connection, body = await _get(pool)
            assert (connection.status, body) == (200, b"{}")
            pool.release(connection)

    asyncio.run(main())


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ],
    ids=["content-length", "chunked"],
)
def test_an_answer_cut_short_is_broken(answer: bytes) -> None:
    async def main() -> None:
        async with serving(answering(answer, then_close=True)) as pool:
            connection = await pool.acquire(head_only=False)
            connection.send(GET, last=True)
            await connection.response_head()
            await connection.more()
            assert connection.take() == b"abc"
            with pytest.raises(Broken):
                await connection.more()
            pool.release(connection)

    asyncio.run(main())


def test_garbage_before_any_answer_is_broken() -> None:
    async def main() -> None:
        async with serving(answering(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")) as pool:
            connection = await pool.acquire(head_only=False)
            connection.send(GET, last=True)
            with pytest.raises(Broken):
                await connection.response_head()
            pool.release(connection)

    asyncio.run(main())


def test_time_out_wakes_the_waiter_with_stalled() -> None:
    async def main() -> None:
        async with serving(answering()) as pool:  # reads nothing, answers nothing
            connection = await pool.acquire(head_only=False)
            connection.send(GET, last=True)
            asyncio.get_running_loop().call_later(0.05, connection.time_out, 0.05)
            with pytest.raises(Stalled) as stalled:
                async with asyncio.timeout(5):  # not woken: TimeoutError instead
                    await connection.response_head()
            assert str(stalled.value) == (
                "InvoisX did not answer within 0.05 s (INVOISX_PROXY_UPSTREAM_TIMEOUT)."
            )
            assert not connection.is_open
            pool.release(connection)

    asyncio.run(main())


def test_nothing_listening_is_unreachable() -> None:
    async def main() -> None:
        origin = Origin.from_url(f"http://127.0.0.1:{free_port()}/api/v1")
        pool = Pool(origin, limit=1, connect_timeout=0.5, idle_timeout=15)
        pool.open(asyncio.get_running_loop())
        with pytest.raises(Unreachable) as unreachable:
            await pool.acquire(head_only=False)
        assert str(unreachable.value) == "InvoisX could not be reached: the connection was refused."
        # The failed connect gave its turn back: the next call may try again at once.
        with pytest.raises(Unreachable):
            await asyncio.wait_for(pool.acquire(head_only=False), 0.4)

    asyncio.run(main())


def test_calls_beyond_the_limit_wait_their_turn_in_order() -> None:
    async def main() -> None:
        async with serving(answering(OK, OK, OK)) as pool:  # limit 2
            held = [await pool.acquire(head_only=False) for _ in range(2)]
            order: list[int] = []

            async def queued(number: int) -> None:
                connection = await pool.acquire(head_only=False)
                order.append(number)
                pool.release(connection)

            waiting = [asyncio.create_task(queued(number)) for number in range(4)]
            await asyncio.sleep(0.05)
            assert order == []  # nobody overtakes the two in use
            for connection in held:
                pool.release(connection)
            await asyncio.gather(*waiting)
            assert order == [0, 1, 2, 3]

    asyncio.run(main())


def test_a_call_that_waits_longer_than_the_connect_timeout_is_unreachable() -> None:
    async def main() -> None:
        async with serving(answering(OK)) as pool:  # limit 2, connect timeout 0.5 s
            held = [await pool.acquire(head_only=False) for _ in range(2)]
            started = asyncio.get_running_loop().time()
            with pytest.raises(Unreachable) as unreachable:
                await pool.acquire(head_only=False)
            assert str(unreachable.value) == (
                "No connection to InvoisX came free within 0.5 s: all 2 "
                "(INVOISX_PROXY_MAX_UPSTREAM_CONNECTIONS) stayed busy."
            )
            assert 0.45 <= asyncio.get_running_loop().time() - started < 1.5
            for connection in held:
                pool.release(connection)

    asyncio.run(main())


def test_waiters_that_give_up_keep_no_turn() -> None:
    async def main() -> None:
        async with serving(answering(OK)) as pool:  # limit 2
            held = [await pool.acquire(head_only=False) for _ in range(2)]
            quitters = [asyncio.create_task(pool.acquire(head_only=False)) for _ in range(3)]
            await asyncio.sleep(0.05)
            for task in quitters:
                task.cancel()
            await asyncio.gather(*quitters, return_exceptions=True)
            for connection in held:
                pool.release(connection)
            # Both turns are free again: two calls get a connection without waiting.
            again = [await asyncio.wait_for(pool.acquire(head_only=False), 0.3) for _ in range(2)]
            for connection in again:
                pool.release(connection)

    asyncio.run(main())


def test_origin_leaves_the_default_port_out_of_the_host_header() -> None:
    assert Origin.from_url("https://invoisx.com/api/v1") == Origin(
        "invoisx.com", 443, True, b"invoisx.com", b"/api/v1"
    )
    assert Origin.from_url("http://127.0.0.1:8081/api/v1").host_header == b"127.0.0.1:8081"
    ipv6 = Origin.from_url("http://[::1]:9000/v1")
    assert (ipv6.host, ipv6.port, ipv6.host_header) == ("::1", 9000, b"[::1]:9000")


def test_connections_idle_too_long_are_closed() -> None:
    async def main() -> None:
        async with serving(answering(OK, OK)) as pool:
            first, _ = await _get(pool)
            pool.release(first)
            pool.expire(first.idle_since + 14)
            assert first.is_open
            pool.expire(first.idle_since + 16)
            assert not first.is_open
            await _get_on_another(pool, first)

    asyncio.run(main())


def test_response_headers_beyond_the_limit_are_broken() -> None:
    flood = b"HTTP/1.1 200 OK\r\n" + b"X-Flood: " + b"a" * 70_000 + b"\r\n\r\n"

    async def main() -> None:
        async with serving(answering(flood)) as pool:
            connection = await pool.acquire(head_only=False)
            connection.send(GET, last=True)
            with pytest.raises(Broken, match=r"^InvoisX's response headers ran over 64 KiB\.$"):
                await connection.response_head()
            assert not connection.head_in
            pool.release(connection)

    asyncio.run(main())


def test_an_upload_stops_when_the_connection_drops() -> None:
    async def swallow_then_reset(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(1_000_000)
        writer.transport.abort()

    async def main() -> None:
        async with serving(swallow_then_reset) as pool:
            connection = await pool.acquire(head_only=False)
            connection.send(
                b"POST /api/v1/x HTTP/1.1\r\ncontent-length: 100000000\r\n\r\n", last=False
            )
            sent = 0
            with pytest.raises(Broken):
                while sent < 100_000_000:
                    connection.send(b"x" * 65_536, last=False)
                    sent += 65_536
                    await connection.drain()
            assert sent < 20_000_000
            pool.release(connection)

    asyncio.run(main())


def test_a_header_that_never_ends_is_broken_once_past_the_limit() -> None:
    async def endless_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(400):  # 4 MB at most, a 10 KB piece at a time
                writer.write(b"a" * 10_000)
                await writer.drain()
        writer.close()

    async def main() -> None:
        async with serving(endless_header) as pool:
            connection = await pool.acquire(head_only=False)
            connection.send(GET, last=True)
            with pytest.raises(Broken, match=r"^InvoisX's response headers ran over 64 KiB\.$"):
                await connection.response_head()
            pool.release(connection)

    asyncio.run(main())


def test_an_answer_without_framing_cut_by_a_reset_is_broken() -> None:
    async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\n\r\n{"data": [1, 2, 3')
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    async def main() -> None:
        async with serving(reset_mid_body) as pool:
            connection = await pool.acquire(head_only=False)
            connection.send(GET, last=True)
            await connection.response_head()
            await connection.more()
            assert connection.take() == b'{"data": [1, 2, 3'
            with pytest.raises(Broken):
                await connection.more()
            assert not connection.complete
            pool.release(connection)

    asyncio.run(main())


def test_over_tls_an_answer_without_framing_never_counts_as_complete() -> None:
    # Over TLS a cut connection looks like a closed one, so "ended at close" proves nothing.
    unframed = b"HTTP/1.1 200 OK\r\n\r\nuntil close"

    async def main() -> None:
        handler = closing(answering(unframed, then_close=True))
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        port = server.sockets[0].getsockname()[1]
        _, connection = await loop.create_connection(
            lambda: Connection(loop, tls=True), "127.0.0.1", port
        )
        connection.begin(head_only=False)
        connection.send(GET, last=True)
        await connection.response_head()
        body = b""
        with pytest.raises(Broken):
            while True:
                await connection.more()
                body += connection.take()
        assert body == b"until close"
        connection.abort()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)  # the aborted transport reports its loss on a later turn

    asyncio.run(main())


def test_an_answer_before_the_whole_upload_is_sent_ends_the_connection() -> None:
    async def answer_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: the body is not read
        writer.write(OK)
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with serving(answer_at_once) as pool:
            connection = await pool.acquire(head_only=False)
            connection.send(b"POST /api/v1/x HTTP/1.1\r\ncontent-length: 4\r\n\r\n", last=False)
            await connection.response_head()
            while not connection.complete:
                await connection.more()
            assert connection.take() == b"{}"
            connection.send(b"body", last=True)  # too late: InvoisX answered without it
            assert (connection.complete, connection.reusable) == (True, False)
            pool.release(connection)
            await _get_on_another(pool, connection)

    asyncio.run(main())


@pytest.mark.parametrize(
    "answer",
    [
        OK.replace(b" 200 OK", b" 777 X"),
        OK.replace(b" 200 OK", b" 099 X"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nuntil close",
    ],
    ids=["status-777", "status-099", "gzip-chunked", "gzip-then-chunked", "gzip-until-close"],
)
def test_answers_that_cannot_be_passed_on_truthfully_are_broken(answer: bytes) -> None:
    async def main() -> None:
        async with serving(answering(answer)) as pool:
            connection = await pool.acquire(head_only=False)
            connection.send(GET, last=True)
            with pytest.raises(Broken):
                # Bounded: taken for an interim answer, a 099 would leave it waiting for good.
                await asyncio.wait_for(connection.response_head(), 5)
            assert not connection.reusable
            pool.release(connection)

    asyncio.run(main())


def test_a_trailer_that_never_ends_is_broken_once_past_the_limit() -> None:
    sent = 0
    stopped = asyncio.Event()

    async def endless_trailer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-E: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(3200):  # 32 MB at most, a 10 KB piece at a time
                writer.write(b"a" * 10_000)
                await writer.drain()
                sent += 10_000
        stopped.set()

    async def main() -> None:
        async with serving(endless_trailer) as pool:
            connection = await pool.acquire(head_only=False)
            connection.send(GET, last=True)
            await connection.response_head()
            body = b""
            with pytest.raises(Broken, match=r"chunk framing or trailers ran over 64 KiB without"):
                while True:
                    await connection.more()
                    body += connection.take()
            assert body == b"abc"
            pool.release(connection)
            # The hang-up stopped the stand-in after what the kernels' buffers took (some MB).
            await asyncio.wait_for(stopped.wait(), 5)
            assert sent < 16_000_000

    asyncio.run(main())


def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize("hang_up", [_close, _reset], ids=["close", "reset"])
def test_only_a_reused_connection_closed_before_any_answer_byte_is_dropped(
    hang_up: Callable[[asyncio.StreamWriter], None],
) -> None:
    connections = 0

    async def answer_once_then_hang_up(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:  # later connections are hung up on at their first request
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK)
            await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        hang_up(writer)

    async def send_get(connection: Connection) -> None:
        connection.send(GET, last=True)
        await connection.response_head()

    async def main() -> None:
        async with serving(answer_once_then_hang_up) as pool:
            first, _ = await _get(pool)
            pool.release(first)
            reused = await pool.acquire(head_only=False)
            assert reused is first
            with pytest.raises(Dropped):
                await send_get(reused)
            pool.release(reused)
            new = await pool.acquire(head_only=False)
            with pytest.raises(Broken) as failure:
                await send_get(new)
            assert not isinstance(failure.value, Dropped)
            pool.release(new)

    asyncio.run(main())


def test_a_fresh_connection_leaves_the_idle_ones_alone() -> None:
    async def main() -> None:
        async with serving(answering(OK, OK)) as pool:
            first, _ = await _get(pool)
            pool.release(first)
            fresh = await pool.acquire(head_only=False, fresh=True)
            assert fresh is not first
            pool.release(fresh)
            again = await pool.acquire(head_only=False)
            assert again is first
            pool.release(again)

    asyncio.run(main())


# --- what the client is told: one message for each way an exchange fails -------------------


async def _failure(pool: Pool, request: bytes = GET) -> str:
    """Run one exchange to its end; the text of the `UpstreamError` that ended it."""
    connection = await pool.acquire(head_only=False)
    try:
        connection.send(request, last=True)
        async with asyncio.timeout(5):
            await connection.response_head()
            while not connection.complete:
                await connection.more()
                connection.take()
    except (Broken, Stalled) as error:
        return str(error)
    finally:
        pool.release(connection)
    raise AssertionError("the exchange ended cleanly")


async def _read_request_then_close(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    # Read first: closing with unread bytes makes the kernel send a reset instead of a FIN.
    await reader.readuntil(b"\r\n\r\n")


async def _read_request_then_reset(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    _reset(writer)


_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (
            answering(b"\x00\xffSSH-2.0-OpenSSH_9.6\r\n\r\n"),
            "InvoisX answered with something that is not HTTP.",
        ),
        (
            answering(b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n"),
            "InvoisX's answer has an invalid status line (invalid status code).",
        ),
        (
            answering(b"HTTP/1.1 200 OK\r\nX Y: z\r\nContent-Length: 0\r\n\r\n"),
            "InvoisX's answer has invalid headers (invalid header token).",
        ),
        (
            answering(b"HTTP/1.1 777 X\r\nContent-Length: 0\r\n\r\n"),
            "InvoisX answered with status 777, which HTTP does not have.",
        ),
        (
            answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            "InvoisX's answer has a Transfer-Encoding other than chunked, which the proxy can "
            "neither decode nor pass on.",
        ),
        (
            answering(_CHUNKED + b"zz\r\n"),
            "InvoisX's answer broke its chunked framing (invalid character in chunk size).",
        ),
        (
            _read_request_then_close,
            "InvoisX closed the connection before any answer.",
        ),
        (
            _read_request_then_reset,
            "The connection to InvoisX was reset before any answer.",
        ),
        (
            answering(b"HTTP/1.1 200 OK\r\nContent-Ty", then_close=True),
            "InvoisX closed the connection in the middle of the response headers.",
        ),
        (
            answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", then_close=True),
            "InvoisX closed the connection in the middle of the answer.",
        ),
        (
            answering(_CHUNKED + b"3\r\nabc\r\n", then_close=True),
            "InvoisX closed the connection in the middle of the answer.",
        ),
    ],
    ids=[
        "not-http",
        "bad-status-line",
        "bad-header",
        "status-777",
        "transfer-coding",
        "bad-chunk",
        "closed-before-answering",
        "reset-before-answering",
        "closed-mid-headers",
        "closed-mid-body",
        "closed-mid-chunks",
    ],
)
def test_each_failure_says_what_happened(handler: Handler, message: str) -> None:
    async def main() -> None:
        async with serving(handler) as pool:
            assert await _failure(pool) == message

    asyncio.run(main())


def test_a_kept_alive_connection_closed_before_answering_says_so() -> None:
    async def answer_once_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")

    async def main() -> None:
        async with serving(answer_once_then_close) as pool:
            first, _ = await _get(pool)
            pool.release(first)
            assert await _failure(pool) == (
                "InvoisX closed the connection before any answer (a kept-alive connection, "
                "which InvoisX may have timed out just as the request arrived)."
            )

    asyncio.run(main())


def test_a_stall_says_where_the_exchange_stood() -> None:
    head_then_silence = answering(b"HTTP/1.1 200 OK\r\nContent-Le")
    body_then_silence = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    async def stalled(pool: Pool, timeout: float) -> str:
        connection = await pool.acquire(head_only=False)
        connection.send(GET, last=True)
        await asyncio.sleep(0.1)  # what the server sends before falling silent is in
        connection.time_out(timeout)
        try:
            await connection.response_head()
            while True:
                await connection.more()
                connection.take()
        except Stalled as error:
            return str(error)
        finally:
            pool.release(connection)

    async def main() -> None:
        async with serving(head_then_silence) as pool:
            assert await stalled(pool, 0.3) == (
                "InvoisX's response headers stalled for 0.3 s (INVOISX_PROXY_UPSTREAM_TIMEOUT)."
            )
        async with serving(body_then_silence) as pool:
            assert await stalled(pool, 2) == (
                "InvoisX's answer stalled for 2 s (INVOISX_PROXY_UPSTREAM_TIMEOUT)."
            )
        async with serving(answering()) as pool:
            connection = await pool.acquire(head_only=False)
            connection.send(GET, last=True)
            connection.headers_overdue(0.9)
            with pytest.raises(Stalled) as overdue:
                await connection.response_head()
            assert str(overdue.value) == (
                "InvoisX's response headers were not complete within 0.9 s "
                "(three times INVOISX_PROXY_UPSTREAM_TIMEOUT)."
            )
            pool.release(connection)

    asyncio.run(main())


def test_an_upload_invoisx_stops_taking_says_so() -> None:
    async def main() -> None:
        done = asyncio.Event()

        async def read_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await done.wait()

        async with serving(read_nothing) as pool:
            connection = await pool.acquire(head_only=False)
            connection.send(
                b"POST /api/v1/x HTTP/1.1\r\ncontent-length: 90000000\r\n\r\n", last=False
            )
            connection.send(b"x" * 65_536, last=False)
            connection.time_out(0.3)  # the forward stage's watch, after 0.3 s of no room
            with pytest.raises(Stalled) as stalled:
                await connection.drain()
            assert str(stalled.value) == (
                "InvoisX stopped taking the request body for 0.3 s "
                "(INVOISX_PROXY_UPSTREAM_TIMEOUT)."
            )
            pool.release(connection)
            done.set()

    asyncio.run(main())


def _pool_to(url: str, connect_timeout: float = 0.5) -> Pool:
    pool = Pool(Origin.from_url(url), limit=1, connect_timeout=connect_timeout, idle_timeout=15)
    pool.open(asyncio.get_running_loop())
    return pool


def test_a_tls_handshake_with_a_server_that_does_not_speak_tls_says_so() -> None:
    async def blurt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK)  # plain HTTP where the client expects a TLS ServerHello
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server = await asyncio.start_server(closing(blurt), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            pool = _pool_to(f"https://127.0.0.1:{port}/api/v1")
            with pytest.raises(Unreachable) as unreachable:
                await pool.acquire(head_only=False)
        finally:
            server.close()
        assert str(unreachable.value) == "InvoisX could not be reached: the TLS handshake failed."

    asyncio.run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_certificate_that_does_not_verify_says_so(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    async def main() -> None:
        handler = closing(answering(OK))
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        try:
            pool = _pool_to(f"https://127.0.0.1:{port}/api/v1")
            with pytest.raises(Unreachable) as unreachable:
                await pool.acquire(head_only=False)
        finally:
            server.close()
        assert str(unreachable.value) == (
            "InvoisX could not be reached: its TLS certificate could not be verified."
        )

    asyncio.run(main())


def test_a_connect_that_never_completes_says_how_long_it_waited() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    # neither succeeds nor fails until the client gives up.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)

            async def main() -> None:
                pool = _pool_to(f"http://127.0.0.1:{port}/api/v1", connect_timeout=0.3)
                with pytest.raises(Unreachable) as unreachable:
                    await pool.acquire(head_only=False)
                assert str(unreachable.value) == (
                    "InvoisX could not be reached: no connection within 0.3 s "
                    "(INVOISX_PROXY_UPSTREAM_TIMEOUT)."
                )

            asyncio.run(main())
        finally:
            for filler in fillers:
                filler.close()


_REFUSED_TWICE = (
    "Multiple exceptions: [Errno 111] Connect call failed ('::1', 8000, 0, 0), "
    "[Errno 111] Connect call failed ('127.0.0.1', 8000)"
)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            "its host name could not be resolved",
        ),
        (OSError(_REFUSED_TWICE), "the connection was refused"),
        (OSError(_REFUSED_TWICE.replace("111", "113", 1)), "the connection failed"),
        (
            OSError(errno.ENETUNREACH, "Network is unreachable"),
            "the connection failed (Network is unreachable)",
        ),
        (
            # asyncio's own shape, which names InvoisX's address: only errno's text is told.
            OSError(errno.EHOSTUNREACH, "Connect call failed ('203.0.113.9', 443)"),
            "the connection failed (No route to host)",
        ),
        (OSError("odd"), "the connection failed"),
    ],
    ids=[
        "dns",
        "refused-on-every-address",
        "refused-on-one-only",
        "no-route",
        "asyncio-names-the-address",
        "unknown",
    ],
)
def test_connect_failures_the_loopback_cannot_stage_are_named(error: OSError, message: str) -> None:
    assert connect_failure(error) == f"InvoisX could not be reached: {message}."
