"""What keeping httpx as the forward stage's client API would cost (README, Performance).

httpx's client layer (build_request, send, the response stream, aclose) runs here over a
transport that answers at once, so what is measured is the layer alone, whatever transport
would sit under it:

    python bench/httpx_layer.py                 # CPU per call, in isolation
    python bench/run.py --only direct,nginx-proxy,invoisx-proxy --skip-streaming \
        --skip-memory --proxy-cmd ".venv/bin/python bench/httpx_layer.py serve"

`serve` runs the real proxy with one pass through that layer added to every API call: the
least any httpx transport under the forward stage would add.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.app import create_app
from proxy.serving import run_until_signalled, server_config, tune_gc
from proxy.settings import load_settings

_BODY = b'{"success":true,"data":[]}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"26")]


class _Body(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield _BODY


class _Instant(httpx.AsyncBaseTransport):
    """A transport that does no I/O: every request gets the same small answer."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=_HEADERS, stream=_Body())


async def through_httpx(
    client: httpx.AsyncClient, path: str, headers: list[tuple[bytes, bytes]]
) -> None:
    """One call through httpx's client layer, streamed as the forward stage streams."""
    request = client.build_request("GET", path, headers=headers)
    response = await client.send(request, stream=True)
    async for _chunk in response.aiter_raw():
        pass
    await response.aclose()


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=_Instant(), base_url="http://127.0.0.1", timeout=30)


async def _per_call_us(calls: int) -> float:
    client = _client()
    headers = [(b"authorization", b"Bearer token"), (b"accept", b"application/json")]
    for _ in range(calls // 10):
        await through_httpx(client, "/api/v1/buyers", headers)
    started = time.perf_counter()
    for _ in range(calls):
        await through_httpx(client, "/api/v1/buyers", headers)
    return (time.perf_counter() - started) / calls * 1e6


class _WithHttpxLayer:
    """The proxy app, with one pass through httpx's client layer before every API call."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.client = _client()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/v1/"):
            await through_httpx(self.client, scope["path"], scope["headers"])
        await self.app(scope, receive, send)


def _serve(host: str, port: int) -> None:
    settings = load_settings(host=host, port=port)
    server = uvicorn.Server(server_config(_WithHttpxLayer(create_app(settings)), settings))
    tune_gc()
    run_until_signalled(server)


def main() -> None:
    """Print the layer's CPU per call, or (`serve`) run the proxy with the layer added."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=["serve"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--calls", type=int, default=50_000, help="calls timed (50000)")
    args = parser.parse_args()
    if args.command == "serve":
        _serve(args.host, args.port)
        return
    print(f"httpx client layer: {asyncio.run(_per_call_us(args.calls)):.1f} us a call")


if __name__ == "__main__":
    main()
