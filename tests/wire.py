"""Raw HTTP/1.1 over loopback sockets, and the envelope every proxy-made error must have.

httpx normalises what the property and fault tests need to send as is (odd methods, encoded
paths, duplicate or oddly cased headers) and hides how a response ended, so these tests write
request bytes themselves and parse the answer strictly.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PROXY_ERRORS", "RawResponse", "assert_proxy_error", "exchange", "parse_response"]


_ERROR_TABLE_HEADING = "## Errors the proxy answers itself"


def _documented_errors() -> dict[str, int]:
    """README's table under "Errors the proxy answers itself": error_code -> status.

    The table is the first run of `|` lines after that heading, kept sorted by status, then
    by error_code, so a reader finds a status where it belongs.
    """
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    heading = f"\n{_ERROR_TABLE_HEADING}\n"
    assert heading in readme, f"README has no heading {_ERROR_TABLE_HEADING!r}"
    section = readme.split(heading, 1)[1].split("\n## ", 1)[0]
    table = re.search(r"^\|.*\|$(?:\n^\|.*\|$)*", section, flags=re.MULTILINE)
    assert table, "README's error table moved or changed shape"
    rows = re.findall(r"^\| (\d{3}) \| `([A-Z_]+)` \|", table[0], flags=re.MULTILINE)
    assert rows == sorted(rows), "README's error table is not sorted by status, then error_code"
    assert len({code for _, code in rows}) == len(rows), "an error_code listed twice"
    return {code: int(status) for status, code in rows}


# The contract the tests check against is the documented one, so a new error code needs a
# README row before any test accepts it.
PROXY_ERRORS = _documented_errors()
assert {"BAD_REQUEST", "FORBIDDEN", "UPSTREAM_UNAVAILABLE", "UPSTREAM_TIMEOUT"} <= set(
    PROXY_ERRORS
), "README's error table moved or changed shape"


@dataclass
class RawResponse:
    """One HTTP/1.1 response as it came off the socket; `complete` is False if cut short."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(port: int, request: bytes, *, timeout: float = 10.0) -> bytes:
    """Send `request` to 127.0.0.1:`port` and read until the server closes the connection.

    A reset after the answer counts as the end: the server may close with unread bytes.
    """
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        # The server may answer (and close) before taking the whole upload.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(request)
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                received += chunk
    return bytes(received)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    body = bytearray()
    while True:
        line, found, data = data.partition(b"\r\n")
        if not found:
            return bytes(body), False
        size = int(line.split(b";", 1)[0], 16)
        if size == 0:
            return bytes(body), True
        if len(data) < size + 2:
            return bytes(body + data[:size]), False
        body += data[:size]
        data = data[size + 2 :]


def parse_response(raw: bytes, *, head: bool = False) -> RawResponse:
    """Parse one response (after any 1xx interim ones); raises ValueError on garbage."""
    while True:
        head_bytes, found, rest = raw.partition(b"\r\n\r\n")
        if not found or not head_bytes.startswith(b"HTTP/1.1 "):
            raise ValueError(f"not an HTTP/1.1 response: {raw[:200]!r}")
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        if not 100 <= status < 200:
            break
        raw = rest
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    response = RawResponse(status, headers, b"", complete=True)
    if head or status in (204, 304):
        return response
    if any("chunked" in value.lower() for value in response.header("transfer-encoding")):
        response.body, response.complete = _dechunk(rest)
    elif lengths := response.header("content-length"):
        response.body = rest[: int(lengths[0])]
        response.complete = len(rest) == int(lengths[0])
    else:
        response.body = rest
    return response


def assert_proxy_error(response: RawResponse, *, head: bool = False) -> dict[str, Any] | None:
    """If `response` is an error the proxy made itself, check its envelope and return the body.

    Proxy-made means: `success: false` and an error code from README's table. Such a response
    must carry X-Request-ID and the documented status for its code. Returns None otherwise.
    A HEAD answer has no body, so there only the headers can be checked (pass `head`).
    """
    if head:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("success") is not False:
        return None
    code = body.get("error_code")
    if code not in PROXY_ERRORS:
        return None
    assert isinstance(body.get("message"), str), body
    assert body["message"], body
    assert response.status == PROXY_ERRORS[code], (response.status, body)
    assert response.header("x-request-id"), response.headers
    assert response.header("content-type") == ["application/json"], response.headers
    assert response.complete, "an error envelope must arrive whole"
    return body
