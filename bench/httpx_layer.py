"""What keeping httpx as the forward stage's client API would cost (bench/README.md).

httpx's client layer (build_request, send, the response stream, aclose) runs here over a
transport that answers at once, so what is measured is the layer alone, whatever transport
would sit under it:

    .venv/bin/python bench/httpx_layer.py       # CPU per call, in isolation
    .venv/bin/python bench/run.py --only direct,nginx-proxy,invoisx-proxy --rounds 6 \
        --skip-streaming --skip-memory --proxy-cmd ".venv/bin/python bench/httpx_layer.py serve"

(from the repository's root). `serve` runs the real proxy with one pass through that layer
added to every API call: the least any httpx transport under the forward stage would add.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.app import create_app
from proxy.config.settings import ConfigError, load_settings
from proxy.server.serving import run_until_signalled, server_config, tune_gc
from proxy.upstream.headers import request_headers

_BODY = b'{"success":true,"data":[]}'
_ANSWER_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BODY))]
# The benchmark's call, with the headers the forward stage would give httpx for it.
_PATH = "/api/v1/buyers"
_HEADERS = request_headers([(b"host", b"127.0.0.1")], b"Bearer token", False, "0" * 32)


class _Body(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield _BODY


class _Instant(httpx.AsyncBaseTransport):
    """A transport that does no I/O: every request gets the same small answer."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=_ANSWER_HEADERS, stream=_Body())


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=_Instant(), base_url="http://127.0.0.1", timeout=30)


async def through_httpx(client: httpx.AsyncClient) -> None:
    """The benchmark's GET through httpx's client layer, its answer streamed as the proxy does."""
    request = client.build_request("GET", _PATH, headers=_HEADERS)
    response = await client.send(request, stream=True)
    async for _chunk in response.aiter_raw():
        pass
    await response.aclose()


async def _cpu_us_per_call(calls: int) -> float:
    async with _client() as client:
        for _ in range(calls // 10):
            await through_httpx(client)
        started = time.process_time()
        for _ in range(calls):
            await through_httpx(client)
        return (time.process_time() - started) / calls * 1e6


class _WithHttpxLayer:
    """The proxy app with one pass through httpx's layer in front of every API call.

    Calls the proxy refuses pay for it too; the benchmark sends only allowed GETs.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.client = _client()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/v1/"):
            await through_httpx(self.client)
        await self.app(scope, receive, send)


def _serve(args: argparse.Namespace) -> None:
    overrides = {name: getattr(args, name) for name in ("host", "port", "config")}
    settings = load_settings(
        **{name: value for name, value in overrides.items() if value is not None}
    )
    server = uvicorn.Server(server_config(_WithHttpxLayer(create_app(settings)), settings))
    tune_gc()
    run_until_signalled(server)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="What httpx's client layer costs the proxy.")
    commands = parser.add_subparsers(dest="command")
    measure = commands.add_parser("measure", help="CPU per call in isolation (the default)")
    measure.add_argument("--calls", type=int, default=50_000, help="calls timed (50000)")
    serve = commands.add_parser(
        "serve", help="the proxy with the layer added (settings: INVOISX_*)"
    )
    serve.add_argument("--host", help="listen address (INVOISX_PROXY_HOST)")
    serve.add_argument("--port", type=int, help="listen port (INVOISX_PROXY_PORT)")
    serve.add_argument("--config", help="TOML rules file (INVOISX_PROXY_CONFIG)")
    return parser


def main() -> int:
    """Print the layer's CPU per call, or (`serve`) run the proxy with the layer added."""
    args = _parser().parse_args(sys.argv[1:] or ["measure"])
    if args.command == "measure":
        print(f"httpx client layer: {asyncio.run(_cpu_us_per_call(args.calls)):.1f} us CPU a call")
        return 0
    try:
        _serve(args)
    except ConfigError as error:
        print(f"httpx_layer: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
