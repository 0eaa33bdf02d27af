"""redis-py's asyncio client against a real redis-server: what the shared budget relies on.

A Redis call that outlasts INVOISX_PROXY_REDIS_TIMEOUT is cancelled, so this must be safe.
redis-py before 4.5.4 (CVE-2023-28858, CVE-2023-28859) put the connection of a cancelled
command back in the pool as it was: the next command on it read the cancelled one's reply.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import BlockingConnectionPool, Redis

from tests.conftest import StartRedis


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 2) -> bool:
    """Whether `check()` became true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _client_ids(redis: Redis) -> set[int]:
    return {int(client["id"]) for client in await redis.client_list()}


async def _cancel_a_blocked_blpop(url: str) -> None:
    # One connection only, so the GET below can run on no other than the BLPOP's.
    pool = BlockingConnectionPool.from_url(url, max_connections=1, timeout=5)
    client = Redis(connection_pool=pool)
    other = Redis.from_url(url)
    try:
        await client.set("known", "value")
        blocked_id = await client.client_id()

        blpop = asyncio.ensure_future(client.blpop(["queue"], timeout=5))
        await asyncio.sleep(0.05)

        async def is_blocked() -> bool:
            return int((await other.info("clients"))["blocked_clients"]) == 1

        assert await _eventually(is_blocked), "the BLPOP never reached the server"
        blpop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blpop

        async def is_gone() -> bool:
            return blocked_id not in await _client_ids(other)

        # The server frees a client, and ends its BLPOP, when it reads the end of its
        # connection. That comes on another socket than the LPUSH and could be read after it,
        # so wait for it, but assert it only below: the GET shows first what a kept
        # connection does.
        gone = await _eventually(is_gone)
        # The GET goes out first, as a call that follows a timed-out one would. On a kept
        # connection the server still has the BLPOP blocked and holds the GET behind it;
        # the LPUSH then serves the BLPOP, and the GET reads that reply, [b"queue", b"pushed"].
        get = asyncio.ensure_future(client.get("known"))
        await asyncio.sleep(0.05)
        await other.lpush("queue", "pushed")

        assert await get == b"value"
        assert gone, f"the cancelled BLPOP's connection (client {blocked_id}) is still open"
        assert await client.client_id() != blocked_id, "the BLPOP's connection was reused"
        # No client was blocked on `queue` when the LPUSH came (the cancelled one was freed
        # with its connection), so the server served no BLPOP and the value stays in the list.
        assert await other.lrange("queue", 0, -1) == [b"pushed"]
        assert int((await other.info("clients"))["blocked_clients"]) == 0
    finally:
        await client.aclose()
        await pool.aclose()
        await other.aclose()


def test_cancelled_command_disconnects_its_connection_instead_of_reusing_it(
    start_redis: StartRedis,
) -> None:
    asyncio.run(_cancel_a_blocked_blpop(start_redis().url))


def test_cancelled_command_over_a_unix_socket_too(start_redis: StartRedis) -> None:
    server = start_redis(unix_socket=True)

    asyncio.run(_cancel_a_blocked_blpop(server.unix_url))


def test_redis_server_stops_and_starts_again_with_its_append_only_file(
    start_redis: StartRedis,
) -> None:
    server = start_redis(appendonly=True)

    async def call(*command: str) -> object:
        redis = Redis.from_url(server.url)
        try:
            return await redis.execute_command(*command)
        finally:
            await redis.aclose()

    asyncio.run(call("SET", "kept", "across restarts"))
    first_pid = server.pid
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    server.start()

    assert server.pid != first_pid
    assert asyncio.run(call("GET", "kept")) == b"across restarts"
