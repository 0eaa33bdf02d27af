"""Running uvicorn servers: on a pre-bound socket, in a thread, stopped cleanly.

The demo runs the sandbox and the proxy side by side this way, and the tests use the same
helpers, so what the tests start is what users start.
"""

from __future__ import annotations

import errno
import gc
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from proxy.app import ProxyFirst
from proxy.audit import uvicorn_log_config
from proxy.config.settings import ConfigError, Settings

__all__ = ["bind", "run_until_signalled", "server_config", "serving_in_thread", "tune_gc"]


def server_config(app: ASGIApp, settings: Settings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration the proxy runs with; `options` override (tests use this)."""
    defaults: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": uvicorn_log_config(),
        # The access log would print query strings; the audit log replaces it.
        "access_log": False,
        # The audit log's `peer` must be the real TCP peer: never let a header rewrite it.
        "proxy_headers": False,
        "server_header": False,
        # InvoisX's own Date header passes through; a second one would be confusing.
        "date_header": False,
        # uvloop left some of 256 concurrent connections waiting for seconds (bench/README.md).
        "loop": "asyncio",
        # On SIGTERM: stop accepting, let calls in flight finish for up to this long.
        "timeout_graceful_shutdown": settings.shutdown_grace,
        # Longer than clients keep idle connections in their pools, so a client never reuses
        # one the proxy is closing at that moment; `proxy.server.listener` bounds how many idle.
        "timeout_keep_alive": settings.keepalive_timeout,
        # The proxy's own reading of requests (`proxy.server.listener`); other apps get uvicorn's.
        "http": app.protocol if isinstance(app, ProxyFirst) else "httptools",
    }
    return uvicorn.Config(app, **(defaults | options))


def tune_gc() -> None:
    """Make garbage collection cheap for a long-running proxy (call once, after start-up).

    Start-up objects (modules, settings, the app) live forever: frozen, full collections stop
    rescanning them. Each request allocates short-lived objects freed by reference counting,
    so young-generation collections can run ten times less often than the default.
    """
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


def _exit_zero(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run_until_signalled(server: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
    """Run `server` in this (main) thread until SIGINT or SIGTERM; the process then exits 0."""
    # uvicorn shuts down gracefully, then re-raises the signal it caught to the handler that
    # was there before it; these make that a normal exit instead of a kill or a traceback.
    signal.signal(signal.SIGINT, _exit_zero)
    signal.signal(signal.SIGTERM, _exit_zero)
    server.run(sockets=sockets)


def bind(
    host: str,
    port: int,
    *,
    host_setting: str = "INVOISX_PROXY_HOST",
    port_setting: str = "INVOISX_PROXY_PORT",
) -> socket.socket:
    """A listening-ready TCP socket on `host:port` (port 0 picks a free one).

    Raises `ConfigError` naming `host_setting` or `port_setting`, whichever is at fault, so a
    start-up that cannot listen stops with one line before anything is logged as started.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(port_setting, f"{port} is not a port (0-65535)")
    try:
        found = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ConfigError(host_setting, f"cannot resolve {host!r}: {error.strerror}") from None
    # IPv4 first: `localhost` often resolves to ::1 before 127.0.0.1, and clients are told
    # 127.0.0.1; the next address is tried when one cannot be bound (IPv6 switched off).
    found.sort(key=lambda address: address[0] != socket.AF_INET)
    failure = OSError()
    for family, kind, proto, _, address in found:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as error:
            failure = error
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            return sock
        except OSError as error:
            sock.close()
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                # In use or privileged: the port is at fault, whatever the next address.
                raise ConfigError(
                    port_setting, f"cannot listen on {host}:{port}: {error.strerror}"
                ) from None
            failure = error
    # Not an address of this machine, a link-local one without its interface, IPv6 off.
    raise ConfigError(host_setting, f"cannot listen on {host}:{port}: {failure.strerror}")


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def serving_in_thread(config: uvicorn.Config, sock: socket.socket) -> Iterator[str]:
    """Serve `config` on `sock` from a background thread; yield the base URL once it listens."""
    server = uvicorn.Server(config)
    # Not the main thread, so uvicorn installs no signal handlers: the caller owns the signals.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {_url(sock)} did not start")
            time.sleep(0.005)
        yield _url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
