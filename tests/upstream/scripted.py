"""Scripted loopback servers for the upstream tests, as tests/wire.py is for raw HTTP: each
answers with the bytes a test wants, so the connection and the pool are checked below the
proxy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from proxy.upstream.http11 import Origin
from proxy.upstream.pool import Lease, Pool

__all__ = ["GET", "OK", "Handler", "answering", "closing", "get", "get_on_another", "serving"]

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


async def get_on_another(pool: Pool, first: Lease) -> None:
    """A GET that must get a new connection, not `first`, and its usual answer."""
    second, body = await get(pool)
    assert second.connection is not first.connection
    assert body == b"{}"
    pool.release(second)


async def get(pool: Pool, *, head_only: bool = False) -> tuple[Lease, bytes]:
    lease = await pool.acquire(head_only=head_only)
    lease.connection.send(GET, last=True)
    await lease.connection.response_head()
    body = lease.connection.take()
    while not lease.connection.complete:
        await lease.connection.more()
        body += lease.connection.take()
    return lease, body
