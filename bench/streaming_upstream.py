"""A tiny stdlib HTTP/1.1 upstream for the streaming benchmark.

Every request must carry `Authorization: Bearer <token>` (else 401), except `GET /healthz`.
`GET /api/v1/blob?bytes=N` streams N deterministic pseudo-random bytes (see `blob_chunks`) with a
Content-Length. `POST /api/v1/blob` hashes the request body as it arrives (Content-Length or
chunked) and answers `{"sha256": ..., "bytes": N}`. Nothing is held in memory beyond one chunk.

Run: python bench/streaming_upstream.py --port 8001 --token secret
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import hmac
import json
import random
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qs, urlsplit

__all__ = ["BLOB_SEED", "CHUNK_SIZE", "blob_chunks", "blob_sha256", "main"]

BLOB_SEED = 20240601
CHUNK_SIZE = 64 * 1024
_MAX_HEADER_BYTES = 64 * 1024


def blob_chunks(size: int, seed: int = BLOB_SEED) -> Iterator[bytes]:
    """Yield `size` deterministic pseudo-random bytes in chunks of at most CHUNK_SIZE."""
    rng = random.Random(seed)
    remaining = size
    while remaining > 0:
        n = min(CHUNK_SIZE, remaining)
        yield rng.randbytes(n)
        remaining -= n


def blob_sha256(size: int, seed: int = BLOB_SEED) -> str:
    """The sha256 hex digest of `blob_chunks(size, seed)`."""
    digest = hashlib.sha256()
    for chunk in blob_chunks(size, seed):
        digest.update(chunk)
    return digest.hexdigest()


class _BadRequest(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest("header too large") from exc
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError as exc:
        raise _BadRequest("bad request line") from exc
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def _body_chunks(
    reader: asyncio.StreamReader, headers: dict[str, str]
) -> AsyncIterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        async for chunk in _chunked_body(reader):
            yield chunk
        return
    remaining = int(headers.get("content-length", "0"))
    while remaining > 0:
        chunk = await reader.read(min(CHUNK_SIZE, remaining))
        if not chunk:
            raise _BadRequest("body truncated")
        remaining -= len(chunk)
        yield chunk


async def _chunked_body(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return
        remaining = size
        while remaining > 0:
            chunk = await reader.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                raise _BadRequest("chunk truncated")
            remaining -= len(chunk)
            yield chunk
        await reader.readexactly(2)


def _head(status: str, content_type: str, length: int) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode("latin-1")


async def _send_json(writer: asyncio.StreamWriter, status: str, payload: object) -> None:
    body = json.dumps(payload).encode()
    writer.write(_head(status, "application/json", len(body)) + body)
    await writer.drain()


async def _serve_blob(writer: asyncio.StreamWriter, target: str) -> None:
    query = parse_qs(urlsplit(target).query)
    size = int(query.get("bytes", ["1048576"])[0])
    writer.write(_head("200 OK", "application/octet-stream", size))
    for chunk in blob_chunks(size):
        writer.write(chunk)
        await writer.drain()


async def _hash_upload(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]
) -> None:
    digest = hashlib.sha256()
    total = 0
    async for chunk in _body_chunks(reader, headers):
        digest.update(chunk)
        total += len(chunk)
    await _send_json(writer, "200 OK", {"sha256": digest.hexdigest(), "bytes": total})


async def _discard_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
    async for _chunk in _body_chunks(reader, headers):
        pass


async def _handle_one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authorization: str
) -> bool:
    head = await _read_head(reader)
    if head is None:
        return False
    method, target, headers = head
    path = urlsplit(target).path
    if path == "/healthz":
        await _discard_body(reader, headers)
        await _send_json(writer, "200 OK", {"status": "ok"})
    elif not hmac.compare_digest(headers.get("authorization", ""), authorization):
        await _discard_body(reader, headers)
        await _send_json(writer, "401 Unauthorized", {"error": "unauthorized"})
    elif path == "/api/v1/blob" and method == "GET":
        await _serve_blob(writer, target)
    elif path == "/api/v1/blob" and method == "POST":
        await _hash_upload(reader, writer, headers)
    else:
        await _discard_body(reader, headers)
        await _send_json(writer, "404 Not Found", {"error": "not found"})
    return headers.get("connection", "").lower() != "close"


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authorization: str
) -> None:
    try:
        while await _handle_one(reader, writer, authorization):
            pass
    except (_BadRequest, ValueError):
        await _send_json(writer, "400 Bad Request", {"error": "bad request"})
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _serve(host: str, port: int, token: str) -> None:
    handler = functools.partial(_handle, authorization=f"Bearer {token}")
    server = await asyncio.start_server(handler, host, port, limit=_MAX_HEADER_BYTES)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.host, args.port, args.token))


if __name__ == "__main__":
    main()
