"""A stand-in InvoisX that misbehaves on demand, below HTTP: a raw asyncio TCP server.

The last path segment of each request names what it gets (`/api/v1/fault/<kind>`), so one
server can mix faults across concurrent requests on pooled connections. Kinds:

- `ok`: a small JSON answer, and the connection stays open for the next request;
- `reset`: read the request, then reset the connection (SO_LINGER 0) before any answer;
- `close`: read the request, then close the connection (FIN) before any answer;
- `cut-head`: the status line and part of a header, then close;
- `reset-mid-body`: send the headers and part of the advertised body, then reset;
- `slow`: never answer; wait until the proxy gives up and closes;
- `trickle-headers`: the status line, then header bytes one every 0.1 s, forever;
- `longer`: more body than Content-Length says: a whole second response smuggled behind it;
- `shorter`: less body than Content-Length says, then close;
- `garbage`: bytes that are not HTTP, then close;
- `bad-status`: a status line whose code is not three digits;
- `bad-chunk`: a chunked answer whose first chunk size is not hexadecimal;
- `stream`: a chunked body, a chunk every 20 ms, until the proxy closes;
- `endless-trailer`: a chunked body, then a trailer field that never ends (32 MB at most);
- `status-777`: a status line with a status HTTP does not have;
- `gzip-chunked`: `Transfer-Encoding: gzip, chunked`, the body gzip inside the chunks;
- `gzip-until-close`: `Transfer-Encoding: gzip`, the body running until the connection closes;
- `close-next`, `reset-next`: a small JSON answer after 0.1 s (so that calls at once take
  connections of their own); the connection's next request is read, then the connection is
  closed or reset before any answer, as when InvoisX's keep-alive timeout strikes just then.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

__all__ = ["KINDS", "FaultServer", "running_fault_server"]

OK_BODY = b'{"success":true,"data":[]}'
_OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(OK_BODY)).encode()
    + b"\r\n\r\n"
    + OK_BODY
)
SMUGGLED = b'{"success":true,"data":"SMUGGLED"}'
_SMUGGLED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(SMUGGLED)).encode()
    + b"\r\n\r\n"
    + SMUGGLED
)

# Headers promising a 1000-byte body that never fully arrives.
_PROMISES_1000 = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    # Linger on, zero seconds: close() sends RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _until_peer_closes(reader: asyncio.StreamReader) -> None:
    with suppress(ConnectionError):
        while await reader.read(65536):
            pass


@dataclass
class FaultServer:
    """Counts what it saw: requests per kind, uploads cut short; knows its open connections."""

    port: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    incomplete_uploads: int = 0
    busy: int = 0  # connections serving a fault now, rather than idle between requests
    loop: asyncio.AbstractEventLoop | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    # Connections whose next request is read and then hung up on, and how.
    _hang_ups: dict[asyncio.StreamWriter, Callable[[asyncio.StreamWriter], None]] = field(
        default_factory=dict
    )

    @property
    def open_connections(self) -> int:
        return len(self._writers)

    def close_all(self) -> None:
        """Close every connection from the server side (idle keep-alive ones included)."""
        assert self.loop is not None
        done = threading.Event()

        def close() -> None:
            for writer in self._writers:
                writer.close()
            done.set()

        self.loop.call_soon_threadsafe(close)
        done.wait(5)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            self._hang_ups.pop(writer, None)
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; True to keep the connection for another."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        target = lines[0].split(" ")[1]
        kind = target.split("?")[0].rsplit("/", 1)[-1]
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        if not await self._read_body(reader, headers):
            self.incomplete_uploads += 1
            self.requests[f"{kind} (upload cut)"] += 1
            return False
        if (hang_up := self._hang_ups.pop(writer, None)) is not None:
            self.requests[f"{kind} (hung up)"] += 1
            hang_up(writer)
            return False
        self.requests[kind] += 1
        if kind in _HANG_UP_NEXT:
            self._hang_ups[writer] = _HANG_UP_NEXT[kind]
        self.busy += 1
        try:
            return await FAULTS.get(kind, _ok)(reader, writer)
        finally:
            self.busy -= 1

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bool:
        try:
            if "chunked" in headers.get("transfer-encoding", ""):
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        return True
            await reader.readexactly(int(headers.get("content-length", "0")))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return False
        return True


async def _ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(_OK)
    await writer.drain()
    return True


async def _reset_before_response(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    _reset(writer)
    return False


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


def _answers(raw: bytes, *, keep: bool = False) -> Handler:
    """A fault whose whole answer is `raw`; `keep`: the connection is kept for the next call."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return keep

    return answer


_LONGER_BODY = b'{"success":true}'
_GZIPPED = gzip.compress(OK_BODY)


async def _close_before_response(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    writer.close()
    return False


async def _reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    writer.write(b'{"success":true,"data":[' + b" " * 100)
    await writer.drain()
    await asyncio.sleep(0.05)
    _reset(writer)
    return False


async def _slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await _until_peer_closes(reader)
    return False


async def _trickle_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    await writer.drain()
    closed = asyncio.ensure_future(_until_peer_closes(reader))
    try:
        line = 0
        while not closed.done():
            # Short header lines, so no line-length limit can end this either.
            line += 1
            for byte in b"X-Slow-%d: a\r\n" % line:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
                if closed.done():
                    break
    finally:
        closed.cancel()
    return False


async def _stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    closed = asyncio.ensure_future(_until_peer_closes(reader))
    try:
        for _ in range(1000):  # 20 s at most
            writer.write(b"400\r\n" + b" " * 1024 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
            if closed.done():
                return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    finally:
        closed.cancel()
    return False


async def _endless_trailer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n2\r\n{}\r\n0\r\nX-Endless: "
    )
    for _ in range(3200):
        writer.write(b"a" * 10_000)
        await writer.drain()
    return False


async def _gzip_until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip\r\n\r\n"
        + _GZIPPED
    )
    await writer.drain()
    return False


async def _ok_after_a_while(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await asyncio.sleep(0.1)
    return await _ok(reader, writer)


_HANG_UP_NEXT: dict[str, Callable[[asyncio.StreamWriter], None]] = {
    "close-next": asyncio.StreamWriter.close,
    "reset-next": _reset,
}
FAULTS: dict[str, Handler] = {
    "ok": _ok,
    "reset": _reset_before_response,
    "close": _close_before_response,
    "cut-head": _answers(b"HTTP/1.1 200 OK\r\nContent-Type: appli"),
    "reset-mid-body": _reset_mid_body,
    "slow": _slow,
    "trickle-headers": _trickle_headers,
    # Keeps the connection: whoever reuses it must not read the smuggled answer.
    "longer": _answers(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b%b"
        % (len(_LONGER_BODY), _LONGER_BODY, _SMUGGLED_RESPONSE),
        keep=True,
    ),
    "shorter": _answers(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        b'{"success":true,"data":[]}'
    ),
    "garbage": _answers(b"\x00\xffSSH-2.0-OpenSSH_9.6\r\n\x16\x03\x01 not http at all\r\n\r\n"),
    "bad-status": _answers(
        b"HTTP/1.1 2OO OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    ),
    "bad-chunk": _answers(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"\r\nzz\r\n{}\r\n0\r\n\r\n"
    ),
    "stream": _stream,
    "endless-trailer": _endless_trailer,
    "status-777": _answers(
        b"HTTP/1.1 777 X\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        keep=True,
    ),
    "gzip-chunked": _answers(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        b"%x\r\n%b\r\n0\r\n\r\n" % (len(_GZIPPED), _GZIPPED),
        keep=True,
    ),
    "gzip-until-close": _gzip_until_close,
    "close-next": _ok_after_a_while,
    "reset-next": _ok_after_a_while,
}
KINDS = tuple(FAULTS)


@contextmanager
def running_fault_server() -> Iterator[FaultServer]:
    """The fault server on a free loopback port, in its own thread and event loop."""
    fault = FaultServer()
    loop = asyncio.new_event_loop()
    fault.loop = loop
    ready = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        server = await asyncio.start_server(fault.handle, "127.0.0.1", 0)
        fault.port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await stop.wait()
            server.close()
            # Connections still open (a `slow` one whose client vanished) end with the loop.
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        if not ready.wait(10):
            raise RuntimeError("the fault server did not start")
        yield fault
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
