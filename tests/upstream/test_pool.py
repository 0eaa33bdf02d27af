"""The pool of connections to InvoisX: reuse, the turns that bound it, expiry, connecting.

Each test runs its own event loop with a raw asyncio TCP server that answers with the bytes
the test wants; `Pool.stats` tells what the pool holds, so no test waits for a timeout to
learn it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from proxy.upstream.errors import Broken, Unreachable, connect_failure
from proxy.upstream.http11 import Origin, State
from proxy.upstream.pool import Pool, PoolStats
from tests.conftest import free_port
from tests.upstream.scripted import (
    GET,
    OK,
    answering,
    closing,
    get,
    get_on_another,
    serving,
)

# --- reuse ----------------------------------------------------------------------------------


def test_a_clean_exchange_leaves_its_connection_for_the_next() -> None:
    async def main() -> None:
        async with serving(answering(OK, OK)) as pool:
            first, body = await get(pool)
            assert (first.connection.status, body) == (200, b"{}")
            headers = first.connection.headers
            assert (b"content-type", b"application/json") in headers  # names lowercased
            pool.release(first)
            second, _ = await get(pool)
            assert second.connection is first.connection
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
            first, body = await get(pool, head_only=head_only)
            assert body == (b"" if head_only else b"{}")
            assert not first.connection.reusable
            pool.release(first)
            await get_on_another(pool, first)

    asyncio.run(main())


def test_a_fresh_connection_leaves_the_idle_ones_alone() -> None:
    async def main() -> None:
        async with serving(answering(OK, OK)) as pool:
            first, _ = await get(pool)
            pool.release(first)
            fresh = await pool.acquire(head_only=False, fresh=True)
            assert fresh.connection is not first.connection
            pool.release(fresh)
            again = await pool.acquire(head_only=False)
            assert again.connection is first.connection
            pool.release(again)

    asyncio.run(main())


def test_connections_idle_too_long_are_closed() -> None:
    async def main() -> None:
        async with serving(answering(OK, OK)) as pool:
            first, _ = await get(pool)
            pool.release(first)
            parked = asyncio.get_running_loop().time()
            pool.expire(parked + 14)
            assert first.connection.is_open
            pool.expire(parked + 16)
            assert not first.connection.is_open
            await get_on_another(pool, first)

    asyncio.run(main())


def test_after_a_clean_exchange_the_pool_holds_its_connection_idle() -> None:
    async def main() -> None:
        async with serving(answering(OK)) as pool:  # limit 2
            assert pool.stats() == PoolStats(in_use=0, idle=0, waiting=0, limit=2)
            lease, _ = await get(pool)
            assert pool.stats() == PoolStats(in_use=1, idle=0, waiting=0, limit=2)
            pool.release(lease)
            assert pool.stats() == PoolStats(in_use=0, idle=1, waiting=0, limit=2)
            assert lease.connection.state is State.IDLE
            assert re.fullmatch(r"<Pool 127\.0\.0\.1:\d+ in_use=0/2 idle=1 waiting=0>", repr(pool))

    asyncio.run(main())


def test_a_broken_connection_is_closed_and_not_reused() -> None:
    connections = 0

    async def cut_the_first_answer_short(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            if connections == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                return  # hung up on, seven bytes short
            writer.write(OK)
            await writer.drain()
            await reader.read()

    async def main() -> None:
        async with serving(cut_the_first_answer_short) as pool:
            first = await pool.acquire(head_only=False)
            first.connection.send(GET, last=True)
            await first.connection.response_head()
            with pytest.raises(Broken):
                while not first.connection.complete:
                    await first.connection.more()
                    first.connection.take()
            assert first.connection.state is State.CLOSED
            pool.release(first)
            assert pool.stats() == PoolStats(in_use=0, idle=0, waiting=0, limit=2)
            await get_on_another(pool, first)

    asyncio.run(main())


# --- turns ----------------------------------------------------------------------------------


def test_calls_beyond_the_limit_wait_their_turn_in_order() -> None:
    async def main() -> None:
        async with serving(answering(OK, OK, OK)) as pool:  # limit 2
            held = [await pool.acquire(head_only=False) for _ in range(2)]
            order: list[int] = []

            async def queued(number: int) -> None:
                lease = await pool.acquire(head_only=False)
                order.append(number)
                pool.release(lease)

            waiting = [asyncio.create_task(queued(number)) for number in range(4)]
            await asyncio.sleep(0.05)
            assert order == []  # nobody overtakes the two in use
            for lease in held:
                pool.release(lease)
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
            for lease in held:
                pool.release(lease)

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
            for lease in held:
                pool.release(lease)
            # Both turns are free again: two calls get a connection without waiting.
            again = [await asyncio.wait_for(pool.acquire(head_only=False), 0.3) for _ in range(2)]
            for lease in again:
                pool.release(lease)

    asyncio.run(main())


def test_calls_waiting_for_a_turn_show_in_the_stats() -> None:
    async def main() -> None:
        async with serving(answering(OK)) as pool:  # limit 2
            held = [await pool.acquire(head_only=False) for _ in range(2)]
            waiter = asyncio.create_task(pool.acquire(head_only=False))
            quitter = asyncio.create_task(pool.acquire(head_only=False))
            await asyncio.sleep(0.05)
            assert pool.stats() == PoolStats(in_use=2, idle=0, waiting=2, limit=2)
            assert repr(pool).endswith(" in_use=2/2 idle=0 waiting=2>")
            quitter.cancel()
            await asyncio.gather(quitter, return_exceptions=True)
            assert pool.stats().waiting == 1  # a call that gave up waits no more
            pool.release(held[0])  # nothing sent: closed, and its turn goes to the waiter
            lease = await waiter
            assert 0.04 <= lease.waited < 1
            assert pool.stats() == PoolStats(in_use=2, idle=0, waiting=0, limit=2)
            for each in (held[1], lease):
                pool.release(each)
            assert pool.stats() == PoolStats(in_use=0, idle=0, waiting=0, limit=2)

    asyncio.run(main())


# --- connecting -----------------------------------------------------------------------------


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
