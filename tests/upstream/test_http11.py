"""The HTTP/1.1 connection to InvoisX: framing, parsing, its state, and what each failure says.

Each test runs its own event loop with a raw asyncio TCP server that answers with the bytes
the test wants; connections come from a small pool, as the forwarder gets them, but what is
checked is the `Connection` itself, below the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable

import pytest

from proxy.upstream.errors import Broken, Dropped, Stalled
from proxy.upstream.http11 import Connection, Origin, State, chunk, request_head
from proxy.upstream.pool import Lease, Pool
from tests.upstream.scripted import (
    GET,
    OK,
    Handler,
    answering,
    closing,
    get,
    get_on_another,
    serving,
)

# --- writing the request --------------------------------------------------------------------


def test_request_head_names_the_host_first_and_ends_with_a_blank_line() -> None:
    head = request_head(b"POST", b"/api/v1/x?a=1", b"invoisx.com", [(b"content-length", b"2")])
    assert head == b"POST /api/v1/x?a=1 HTTP/1.1\r\nhost: invoisx.com\r\ncontent-length: 2\r\n\r\n"
    assert request_head(b"GET", b"/", b"h:81", []) == b"GET / HTTP/1.1\r\nhost: h:81\r\n\r\n"


def test_chunk_frames_each_piece_and_the_end_of_the_body() -> None:
    assert chunk(b"abc", False) == b"3\r\nabc\r\n"
    assert chunk(b"x" * 26, True) == b"1a\r\n" + b"x" * 26 + b"\r\n0\r\n\r\n"
    assert chunk(b"", False) == b""  # an empty chunk would end the body
    assert chunk(b"", True) == b"0\r\n\r\n"


def test_origin_leaves_the_default_port_out_of_the_host_header() -> None:
    assert Origin.from_url("https://invoisx.com/api/v1") == Origin(
        "invoisx.com", 443, True, b"invoisx.com", b"/api/v1"
    )
    assert Origin.from_url("http://127.0.0.1:8081/api/v1").host_header == b"127.0.0.1:8081"
    ipv6 = Origin.from_url("http://[::1]:9000/v1")
    assert (ipv6.host, ipv6.port, ipv6.host_header) == ("::1", 9000, b"[::1]:9000")


# --- the connection's state -----------------------------------------------------------------


def test_a_connection_is_active_for_an_exchange_and_idle_between_clean_ones() -> None:
    head, body = OK.split(b"\r\n\r\n")

    async def head_then_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(head + b"\r\n\r\n")
                await asyncio.sleep(0.05)
                writer.write(body)

    async def main() -> None:
        async with serving(head_then_body) as pool:
            lease = await pool.acquire(head_only=False)
            connection = lease.connection
            assert connection.state is State.ACTIVE
            assert repr(connection) == "<Connection active: sending, status 0>"
            connection.send(GET, last=True)
            await connection.response_head()
            assert repr(connection) == "<Connection active: head in, status 200>"
            while not connection.complete:
                await connection.more()
            assert connection.take() == b"{}"
            assert repr(connection) == "<Connection active: complete, status 200>"
            pool.release(lease)
            assert connection.state is State.IDLE
            again, _ = await get(pool)
            assert again.connection is connection
            assert connection.state is State.ACTIVE
            pool.release(again)

    asyncio.run(main())


def test_a_failure_closes_the_connection_at_once_and_a_tainted_exchange_at_release() -> None:
    async def main() -> None:
        async with serving(answering(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")) as pool:
            lease = await pool.acquire(head_only=False)
            lease.connection.send(GET, last=True)
            with pytest.raises(Broken):
                await lease.connection.response_head()
            assert lease.connection.state is State.CLOSED
            assert repr(lease.connection) == "<Connection closed: sent, status 0, tainted>"
            pool.release(lease)
        async with serving(answering(OK)) as pool:
            lease, _ = await get(pool, head_only=True)
            # Complete, but the parser would read what follows a HEAD answer as its body.
            assert repr(lease.connection) == "<Connection active: complete, status 200, tainted>"
            pool.release(lease)
            assert lease.connection.state is State.CLOSED

    asyncio.run(main())


def test_bytes_nobody_asked_for_close_a_new_connection() -> None:
    async def blurt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK)  # before any request
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server = await asyncio.start_server(closing(blurt), "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        port = server.sockets[0].getsockname()[1]
        _, connection = await loop.create_connection(
            lambda: Connection(loop, tls=False), "127.0.0.1", port
        )
        assert (connection.state, repr(connection)) == (State.NEW, "<Connection new>")
        for _ in range(200):  # until the bytes are in
            if connection.state is State.CLOSED:
                break
            await asyncio.sleep(0.01)
        assert connection.state is State.CLOSED
        assert not connection.is_open
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)  # the aborted transport reports its loss on a later turn

    asyncio.run(main())


# --- reading the answer ---------------------------------------------------------------------


def test_interim_answers_are_skipped() -> None:
    async def main() -> None:
        async with serving(answering(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as pool:
            lease, body = await get(pool)
            assert (lease.connection.status, body) == (200, b"{}")
            pool.release(lease)

    asyncio.run(main())


def test_an_answer_without_framing_ends_when_the_connection_closes() -> None:
    unframed = b"HTTP/1.1 200 OK\r\n\r\nuntil close"

    async def main() -> None:
        async with serving(answering(unframed, then_close=True)) as pool:
            lease, body = await get(pool)
            assert body == b"until close"
            assert not lease.connection.reusable
            pool.release(lease)

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
            lease = await pool.acquire(head_only=False)
            lease.connection.send(GET, last=True)
            await lease.connection.response_head()
            await lease.connection.more()
            assert lease.connection.take() == b"abc"
            with pytest.raises(Broken):
                await lease.connection.more()
            pool.release(lease)

    asyncio.run(main())


def test_garbage_before_any_answer_is_broken() -> None:
    async def main() -> None:
        async with serving(answering(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")) as pool:
            lease = await pool.acquire(head_only=False)
            lease.connection.send(GET, last=True)
            with pytest.raises(Broken):
                await lease.connection.response_head()
            pool.release(lease)

    asyncio.run(main())


def test_time_out_wakes_the_waiter_with_stalled() -> None:
    async def main() -> None:
        async with serving(answering()) as pool:  # reads nothing, answers nothing
            lease = await pool.acquire(head_only=False)
            lease.connection.send(GET, last=True)
            asyncio.get_running_loop().call_later(0.05, lease.connection.time_out, 0.05)
            with pytest.raises(Stalled) as stalled:
                async with asyncio.timeout(5):  # not woken: TimeoutError instead
                    await lease.connection.response_head()
            assert str(stalled.value) == (
                "InvoisX did not answer within 0.05 s (INVOISX_PROXY_UPSTREAM_TIMEOUT)."
            )
            assert not lease.connection.is_open
            pool.release(lease)

    asyncio.run(main())


def test_response_headers_beyond_the_limit_are_broken() -> None:
    flood = b"HTTP/1.1 200 OK\r\n" + b"X-Flood: " + b"a" * 70_000 + b"\r\n\r\n"

    async def main() -> None:
        async with serving(answering(flood)) as pool:
            lease = await pool.acquire(head_only=False)
            lease.connection.send(GET, last=True)
            with pytest.raises(Broken, match=r"^InvoisX's response headers ran over 64 KiB\.$"):
                await lease.connection.response_head()
            assert not lease.connection.head_in
            pool.release(lease)

    asyncio.run(main())


def test_an_upload_stops_when_the_connection_drops() -> None:
    async def swallow_then_reset(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(1_000_000)
        writer.transport.abort()

    async def main() -> None:
        async with serving(swallow_then_reset) as pool:
            lease = await pool.acquire(head_only=False)
            lease.connection.send(
                b"POST /api/v1/x HTTP/1.1\r\ncontent-length: 100000000\r\n\r\n", last=False
            )
            sent = 0
            with pytest.raises(Broken):
                while sent < 100_000_000:
                    lease.connection.send(b"x" * 65_536, last=False)
                    sent += 65_536
                    await lease.connection.drain()
            assert sent < 20_000_000
            pool.release(lease)

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
            lease = await pool.acquire(head_only=False)
            lease.connection.send(GET, last=True)
            with pytest.raises(Broken, match=r"^InvoisX's response headers ran over 64 KiB\.$"):
                await lease.connection.response_head()
            pool.release(lease)

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
            lease = await pool.acquire(head_only=False)
            lease.connection.send(GET, last=True)
            await lease.connection.response_head()
            await lease.connection.more()
            assert lease.connection.take() == b'{"data": [1, 2, 3'
            with pytest.raises(Broken):
                await lease.connection.more()
            assert not lease.connection.complete
            pool.release(lease)

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
            lease = await pool.acquire(head_only=False)
            lease.connection.send(
                b"POST /api/v1/x HTTP/1.1\r\ncontent-length: 4\r\n\r\n", last=False
            )
            await lease.connection.response_head()
            while not lease.connection.complete:
                await lease.connection.more()
            assert lease.connection.take() == b"{}"
            lease.connection.send(b"body", last=True)  # too late: InvoisX answered without it
            assert (lease.connection.complete, lease.connection.reusable) == (True, False)
            pool.release(lease)
            await get_on_another(pool, lease)

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
            lease = await pool.acquire(head_only=False)
            lease.connection.send(GET, last=True)
            with pytest.raises(Broken):
                # Bounded: taken for an interim answer, a 099 would leave it waiting for good.
                await asyncio.wait_for(lease.connection.response_head(), 5)
            assert not lease.connection.reusable
            pool.release(lease)

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
            lease = await pool.acquire(head_only=False)
            lease.connection.send(GET, last=True)
            await lease.connection.response_head()
            body = b""
            with pytest.raises(Broken, match=r"chunk framing or trailers ran over 64 KiB without"):
                while True:
                    await lease.connection.more()
                    body += lease.connection.take()
            assert body == b"abc"
            pool.release(lease)
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

    async def send_get(lease: Lease) -> None:
        lease.connection.send(GET, last=True)
        await lease.connection.response_head()

    async def main() -> None:
        async with serving(answer_once_then_hang_up) as pool:
            first, _ = await get(pool)
            pool.release(first)
            reused = await pool.acquire(head_only=False)
            assert reused.connection is first.connection
            with pytest.raises(Dropped):
                await send_get(reused)
            pool.release(reused)
            new = await pool.acquire(head_only=False)
            with pytest.raises(Broken) as failure:
                await send_get(new)
            assert not isinstance(failure.value, Dropped)
            pool.release(new)

    asyncio.run(main())


# --- what the client is told: one message for each way an exchange fails -------------------


async def _failure(pool: Pool, request: bytes = GET) -> str:
    """Run one exchange to its end; the text of the `UpstreamError` that ended it."""
    lease = await pool.acquire(head_only=False)
    try:
        lease.connection.send(request, last=True)
        async with asyncio.timeout(5):
            await lease.connection.response_head()
            while not lease.connection.complete:
                await lease.connection.more()
                lease.connection.take()
    except (Broken, Stalled) as error:
        return str(error)
    finally:
        pool.release(lease)
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
            first, _ = await get(pool)
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
        lease = await pool.acquire(head_only=False)
        lease.connection.send(GET, last=True)
        await asyncio.sleep(0.1)  # what the server sends before falling silent is in
        lease.connection.time_out(timeout)
        try:
            await lease.connection.response_head()
            while True:
                await lease.connection.more()
                lease.connection.take()
        except Stalled as error:
            return str(error)
        finally:
            pool.release(lease)

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
            lease = await pool.acquire(head_only=False)
            lease.connection.send(GET, last=True)
            lease.connection.headers_overdue(0.9)
            with pytest.raises(Stalled) as overdue:
                await lease.connection.response_head()
            assert str(overdue.value) == (
                "InvoisX's response headers were not complete within 0.9 s "
                "(three times INVOISX_PROXY_UPSTREAM_TIMEOUT)."
            )
            pool.release(lease)

    asyncio.run(main())


def test_an_upload_invoisx_stops_taking_says_so() -> None:
    async def main() -> None:
        done = asyncio.Event()

        async def read_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await done.wait()

        async with serving(read_nothing) as pool:
            lease = await pool.acquire(head_only=False)
            lease.connection.send(
                b"POST /api/v1/x HTTP/1.1\r\ncontent-length: 90000000\r\n\r\n", last=False
            )
            lease.connection.send(b"x" * 65_536, last=False)
            lease.connection.time_out(0.3)  # the forward stage's watch, after 0.3 s of no room
            with pytest.raises(Stalled) as stalled:
                await lease.connection.drain()
            assert str(stalled.value) == (
                "InvoisX stopped taking the request body for 0.3 s "
                "(INVOISX_PROXY_UPSTREAM_TIMEOUT)."
            )
            pool.release(lease)
            done.set()

    asyncio.run(main())
