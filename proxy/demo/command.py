"""`invoisx-proxy demo` and `invoisx-proxy sandbox`: the product working with no real token.

The demo runs the sandbox on a free loopback port and the proxy in front of it, each in a
thread; the main thread owns the signals and stops both on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

import uvicorn
from starlette.types import ASGIApp

from proxy.app import create_app
from proxy.audit import uvicorn_log_config
from proxy.config.settings import ConfigError, Settings, load_settings
from proxy.demo.tour import curl_lines, print_tour_report, run_tour
from proxy.sandbox import (
    PERMISSIONS,
    OneLineErrors,
    SandboxToken,
    create_sandbox_app,
    new_token_value,
)
from proxy.server.serving import bind, run_until_signalled, server_config, serving_in_thread

__all__ = ["run_demo", "run_sandbox", "serve_line"]

DEMO_PERMISSIONS = frozenset({"read", "create", "update"})
LOG_FILE_VARIABLE = "INVOISX_PROXY_LOG_FILE"


def _token(name: str, permissions: frozenset[str]) -> SandboxToken:
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=365)
    return SandboxToken(new_token_value(), name, permissions, expires_at=expires)


def _wait_for_stop_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: stop.set())
    stop.wait()


def _sandbox_config(app: ASGIApp) -> uvicorn.Config:
    # The proxy's log shape, and a sandbox failure as one line: the sandbox shares the demo's
    # terminal with the audit lines.
    return uvicorn.Config(
        OneLineErrors(app), log_config=uvicorn_log_config(), log_level="warning", lifespan="off"
    )


def _executable() -> str:
    """The installed `invoisx-proxy` command, spelled so that it runs from any directory."""
    # The script installed next to this interpreter (a venv's bin) is the one to show, even
    # when that bin is not on PATH.
    beside = Path(sys.executable).parent / "invoisx-proxy"
    if beside.is_file():
        return shlex.quote(str(beside.absolute()))
    found = shutil.which("invoisx-proxy")
    if found:
        return shlex.quote(str(Path(found).absolute()))
    return shlex.join([sys.executable, "-m", "proxy"])


def serve_line(api_url: str, token: SandboxToken) -> str:
    """A paste-ready shell line that serves the proxy in front of `api_url` holding `token`."""
    settings = {
        "INVOISX_API_URL": api_url,
        "INVOISX_API_TOKEN": token.value,
        "INVOISX_TOKEN_PERMISSIONS": ",".join(sorted(token.permissions)),
    }
    if token.expires_at is not None:
        settings["INVOISX_TOKEN_EXPIRES_AT"] = token.expires_at.isoformat()
    assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in settings.items())
    return f"{assignments} {_executable()} serve"


def _api_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    # A wildcard address is not one to connect to; a proxy on this machine reaches it here.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}/api/v1" if ":" in host else f"http://{host}:{port}/api/v1"


def run_sandbox(host: str, port: int, rate_limit: int, out: TextIO = sys.stdout) -> None:
    """Serve the sandbox alone until Ctrl-C, after printing its tokens and a proxy line each."""
    tokens = [
        _token("full-access", PERMISSIONS),
        _token("demo", DEMO_PERMISSIONS),
        _token("read-only", frozenset({"read"})),
    ]
    sock = bind(host, port, host_setting="--host", port_setting="--port")
    # Listening before the lines are printed: a line pasted at once waits for uvicorn in the
    # kernel's queue instead of being refused.
    sock.listen()
    url = _api_url(sock)
    print(f"InvoisX sandbox on {url} ({rate_limit or 'no'} requests/minute per token)", file=out)
    print("Tokens it accepts (expire in a year):", file=out)
    for token in tokens:
        print(f"  {token.value}  {token.name}: {','.join(sorted(token.permissions))}", file=out)
    print("Try: the proxy in front of it with one of them, pasted in another shell:", file=out)
    for token in tokens:
        print(f"  {serve_line(url, token)}", file=out)
    out.flush()
    app = create_sandbox_app(tokens, rate_limit_per_minute=rate_limit)
    run_until_signalled(uvicorn.Server(_sandbox_config(app)), sockets=[sock])


def _log_note(audit_path: Path, kept: bool) -> list[str]:
    if not kept:
        return [
            f"Audit log: one JSON line per call, below and in {audit_path}",
            "(removed when the demo stops; --log-file PATH keeps one).",
        ]
    return [
        f"Audit log: one JSON line per call, below and appended to {audit_path}, which stays;",
        f"`{_executable()} audit {shlex.quote(str(audit_path))}` reports on it.",
    ]


def _goodbye(audit_path: Path, kept: bool) -> str:
    if kept:
        return f"Stopping the demo; the audit log stays in {audit_path}."
    return "Stopping the demo."


def _temporary_directory() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="invoisx-proxy-demo-")


def _intro(api_url: str, audit_path: Path, kept: bool) -> str:
    lines = [
        f"invoisx-proxy demo: the proxy listens on {api_url}",
        "in front of a local InvoisX sandbox. The proxy holds a sandbox token with read,",
        "create and update (not delete); clients never need it. Try, in another shell:",
        "",
        *(f"  {line}" for line in curl_lines(api_url)),
        "",
        *_log_note(audit_path, kept),
        f"`{_executable()} demo --tour` runs these steps itself. Ctrl-C stops the demo.",
        "",
    ]
    return "\n".join(lines)


def _proxy_settings(
    token: SandboxToken, api_url: str, host: str, port: int, log_file: Path | None
) -> Settings:
    # Without `log_file`, INVOISX_PROXY_LOG_FILE applies, as for `serve`.
    chosen = {"log_file": log_file} if log_file is not None else {}
    return load_settings(
        env_file=None,
        api_token=token.value,
        api_token_file=None,
        api_url=api_url,
        token_permissions=",".join(sorted(token.permissions)),
        token_expires_at=token.expires_at,
        host=host,
        port=port,
        # The token opens only this process's in-memory sandbox, so an address without
        # client keys puts nothing real at risk.
        allow_anonymous=True,
        config=None,
        **chosen,
    )


def _appendable_size(path: Path, setting: str) -> int:
    """The size of the log file at `path` (created if missing), where this demo's lines start."""
    try:
        with path.open("ab") as log:
            return log.tell()
    except OSError as error:
        raise ConfigError(setting, f"cannot open {path}: {error.strerror}") from None


def run_demo(
    port: int,
    *,
    tour: bool,
    host: str = "127.0.0.1",
    log_file: str | Path | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Run sandbox + proxy; with `tour`, walk through them and return 0 only if all passed.

    `host` is the proxy's listen address (`0.0.0.0` in a container); the sandbox always stays
    on loopback, reachable only through the proxy. The audit log goes to `log_file`, else
    INVOISX_PROXY_LOG_FILE, and is kept; without either it is a temporary file.
    """
    token = _token("invoisx-proxy demo", DEMO_PERMISSIONS)
    proxy_socket = bind(host, port, host_setting="--host", port_setting="--port")
    with ExitStack() as stack:
        stack.callback(proxy_socket.close)
        sandbox_socket = bind("127.0.0.1", 0)
        stack.callback(sandbox_socket.close)
        sandbox_api = _api_url(sandbox_socket)
        flag = Path(log_file) if log_file is not None else None
        listening = proxy_socket.getsockname()[1]
        settings = _proxy_settings(token, sandbox_api, host, listening, flag)
        kept = settings.log_file
        audit_path = kept or Path(stack.enter_context(_temporary_directory())) / "audit.log"
        start = _appendable_size(audit_path, "--log-file" if flag else LOG_FILE_VARIABLE)
        settings = settings.model_copy(update={"log_file": audit_path})
        app = create_app(settings, audit_to_stdout=not tour)
        with ExitStack() as servers:
            sandbox = _sandbox_config(create_sandbox_app([token]))
            servers.enter_context(serving_in_thread(sandbox, sandbox_socket))
            config = server_config(app, settings, log_level="warning")
            proxy_url = servers.enter_context(serving_in_thread(config, proxy_socket))
            if not tour:
                print(_intro(f"{proxy_url}/api/v1", audit_path, bool(kept)), file=out, flush=True)
                _wait_for_stop_signal()
                print(_goodbye(audit_path, bool(kept)), file=out, flush=True)
                return 0
            passed = run_tour(proxy_url, sandbox_api, audit_path, token.value, out, start=start)
        # The servers have stopped, so every line of the tour is in the log by now.
        print_tour_report(audit_path, start, out)
    return 0 if passed else 1
