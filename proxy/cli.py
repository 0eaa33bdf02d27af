"""The `invoisx-proxy` command: a thin layer over `load_settings` and `create_app`."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from proxy import __version__
from proxy.app import create_app
from proxy.audit import uvicorn_log_config
from proxy.settings import ConfigError, Settings, load_settings

__all__ = ["main", "serve", "server_config"]


def server_config(app: ASGIApp, settings: Settings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration the proxy runs with; `options` override (tests use this)."""
    defaults: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": uvicorn_log_config(),
        # The access log would print query strings; the audit log replaces it.
        "access_log": False,
        # The peer address is the audit log's client identity: never let a header rewrite it.
        "proxy_headers": False,
        "server_header": False,
        # InvoisX's own Date header passes through; a second one would be confusing.
        "date_header": False,
    }
    return uvicorn.Config(app, **(defaults | options))


def _exit_zero(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run_until_signalled(server: uvicorn.Server) -> None:
    """Run `server` until SIGINT or SIGTERM, then let the process exit with status 0."""
    # uvicorn shuts down gracefully, then re-raises the signal it caught to the handler that
    # was there before it; these make that a normal exit instead of a kill or a traceback.
    signal.signal(signal.SIGINT, _exit_zero)
    signal.signal(signal.SIGTERM, _exit_zero)
    server.run()


def serve(settings: Settings) -> None:
    """Run the proxy under uvicorn until it is stopped."""
    run_until_signalled(uvicorn.Server(server_config(create_app(settings), settings)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invoisx-proxy",
        description="Authenticating reverse proxy for the InvoisX API (settings: INVOISX_*).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("serve", help="run the proxy (the default)")
    run.add_argument("--host", help="listen address (INVOISX_PROXY_HOST)")
    run.add_argument("--port", type=int, help="listen port (INVOISX_PROXY_PORT)")
    run.add_argument("--config", help="TOML rules file (INVOISX_PROXY_CONFIG)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {
        name: value
        for name, value in (("host", args.host), ("port", args.port), ("config", args.config))
        if value is not None
    }
    try:
        serve(load_settings(**overrides))
    except ConfigError as error:
        print(f"invoisx-proxy: {error}", file=sys.stderr)
        return 2
    return 0
