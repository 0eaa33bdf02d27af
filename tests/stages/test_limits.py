"""Request limits through real sockets: 431 for headers, 413 for a body over the limit,
whether declared or streamed, before InvoisX gets it whole."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx

from tests.conftest import (
    Recorder,
)

Upstream = tuple[Recorder, str]


def test_body_over_limit_by_content_length_is_refused(
    recorder: Upstream, start_proxy: object
) -> None:
    stand_in, upstream = recorder
    proxy = start_proxy(upstream, max_body_bytes=1000)  # type: ignore[operator]
    response = httpx.post(f"{proxy.url}/api/v1/buyers", content=b"x" * 1001)
    assert response.status_code == 413
    assert response.json()["error_code"] == "PAYLOAD_TOO_LARGE"
    assert stand_in.requests == []
    ok = httpx.post(f"{proxy.url}/api/v1/buyers", content=b"x" * 1000)
    assert ok.status_code == 200


def test_headers_over_limit_get_431(recorder: Upstream, start_proxy: object) -> None:
    stand_in, upstream = recorder
    proxy = start_proxy(upstream, max_header_bytes=4096)  # type: ignore[operator]
    big = {"X-Trace": "t" * 5000}
    response = httpx.get(f"{proxy.url}/api/v1/buyers", headers=big)
    assert response.status_code == 431
    assert response.json()["error_code"] == "HEADERS_TOO_LARGE"
    assert "INVOISX_PROXY_MAX_HEADER_BYTES" in response.json()["message"]
    assert stand_in.requests == []
    assert proxy.last_audit()["decision"] == "invalid"
    assert httpx.get(f"{proxy.url}/api/v1/buyers", headers={"X-Trace": "t" * 3000}).is_success


def test_chunked_body_over_limit_is_refused(recorder: Upstream, start_proxy: object) -> None:
    stand_in, upstream = recorder
    proxy = start_proxy(upstream, max_body_bytes=100_000)  # type: ignore[operator]

    def chunks() -> Iterator[bytes]:
        for _ in range(30):
            yield b"y" * 10_000
            # A stream that arrives over time: sent all at once, the whole body could sit in
            # the server's buffer before the proxy reads its first chunk.
            time.sleep(0.002)

    response = httpx.post(f"{proxy.url}/api/v1/buyers", content=chunks())
    assert response.status_code == 413
    assert response.json()["error_code"] == "PAYLOAD_TOO_LARGE"
    line = proxy.last_audit()
    assert line["decision"] == "invalid"
    assert line["bytes_in"] < 300_000  # stopped near the limit, not after the whole body
    # Streaming means the upload had started; it is aborted, never completed upstream.
    assert stand_in.requests == []
