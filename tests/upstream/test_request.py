"""Framing the request InvoisX gets: target, headers, token and body framing, set once."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.types import Message

from proxy.exchange import Exchange
from proxy.stages.limits import Body
from proxy.upstream.http11 import Origin
from proxy.upstream.request import Upload, frame

ORIGIN = Origin.from_url("https://invoisx.com/api/v1")
AUTHORIZATION = b"Bearer ixt_live_secret_token_value"


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def _scope(method: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"method": method, "query_string": b"page=2", "headers": headers or []}


def _body(declared: int | None) -> Body:
    return Body(_receive, Exchange("r1", client="app"), declared=declared, limit=1000)


@pytest.mark.parametrize(
    ("method", "body", "framing", "retryable"),
    [
        ("GET", None, None, True),
        ("POST", None, b"content-length: 0", False),
        ("POST", b'{"a":1}', b"content-length: 7", False),
        ("PUT", "declared", b"content-length: 5", False),
        ("POST", "chunked", b"transfer-encoding: chunked", False),
    ],
)
def test_the_body_is_framed_as_it_will_be_sent(
    method: str, body: object, framing: bytes | None, retryable: bool
) -> None:
    given = _body(5) if body == "declared" else _body(None) if body == "chunked" else body
    assert given is None or isinstance(given, bytes | Body)
    request = frame(ORIGIN, _scope(method), "/buyers", AUTHORIZATION, "r1", given)
    head = request.head.decode()
    assert head.startswith(f"{method} /api/v1/buyers?page=2 HTTP/1.1\r\nhost: invoisx.com\r\n")
    lines = head.split("\r\n")
    assert ("authorization: " + AUTHORIZATION.decode()) in lines
    framed = [line for line in lines if line.startswith(("content-length", "transfer-encoding"))]
    assert framed == ([] if framing is None else [framing.decode()])
    assert isinstance(request.body, Upload) is isinstance(given, Body)
    assert request.retryable is retryable


def test_a_request_never_shows_its_token_or_body_in_a_repr() -> None:
    request = frame(ORIGIN, _scope("POST"), "/buyers", AUTHORIZATION, "r1", b'{"tin":"C1"}')
    shown = repr(request)
    assert "secret_token" not in shown and "C1" not in shown
    assert "POST" in shown
