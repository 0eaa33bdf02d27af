"""A counted HTTP/1.1 keep-alive load loop (exact request counts, unlike wrk's timed runs)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

__all__ = ["CountedLoad", "drive"]


@dataclass(frozen=True)
class CountedLoad:
    """How many requests were sent, how many failed, and how long it took."""

    requests: int
    errors: int
    seconds: float


class _Budget:
    def __init__(self, total: int) -> None:
        self.left = total
        self.errors = 0

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return its status and whether the connection stays open."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = dict(
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(":") for line in lines[1:] if line)
    )
    keep_alive = headers.get("connection", "").lower() != "close"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        await _read_chunked(reader)
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        await reader.read()
        keep_alive = False
    return status, keep_alive


async def _worker(port: int, request: bytes, budget: _Budget) -> None:
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while budget.take():
        try:
            if streams is None:
                streams = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = streams
            writer.write(request)
            await writer.drain()
            status, keep_alive = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            budget.errors += 1
            status, keep_alive = 0, False
        else:
            budget.errors += not 200 <= status < 400
        if not keep_alive and streams is not None:
            streams[1].close()
            streams = None
    if streams is not None:
        streams[1].close()


async def _drive(port: int, request: bytes, total: int, concurrency: int) -> CountedLoad:
    budget = _Budget(total)
    started = time.perf_counter()
    await asyncio.gather(*(_worker(port, request, budget) for _ in range(concurrency)))
    return CountedLoad(total, budget.errors, time.perf_counter() - started)


def drive(port: int, path: str, total: int, concurrency: int = 32) -> CountedLoad:
    """Send exactly `total` GETs for `path` to 127.0.0.1:`port` over `concurrency` connections."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    return asyncio.run(_drive(port, request, total, concurrency))
