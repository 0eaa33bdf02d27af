"""`invoisx-proxy demo` and `invoisx-proxy sandbox`: the product working with no real token.

The demo runs the sandbox on a free loopback port and the proxy in front of it, each in a
thread; the main thread owns the signals and stops both on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

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

from proxy.app import create_app
from proxy.sandbox import SandboxToken, create_sandbox_app, new_token_value
from proxy.serving import bind, run_until_signalled, server_config, serving_in_thread
from proxy.settings import ConfigError, load_settings
from proxy.tour import curl_lines, run_tour

__all__ = ["run_demo", "run_sandbox"]

DEMO_PERMISSIONS = frozenset({"read", "create", "update"})


def _token(name: str, permissions: frozenset[str]) -> SandboxToken:
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=365)
    return SandboxToken(new_token_value(), name, permissions, expires_at=expires)


def _bind(host: str, port: int, setting: str) -> socket.socket:
    try:
        return bind(host, port)
    except OSError as error:
        raise ConfigError(setting, f"cannot listen on {host}:{port}: {error.strerror}") from None


def _wait_for_stop_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: stop.set())
    stop.wait()


def run_sandbox(host: str, port: int, rate_limit: int, out: TextIO = sys.stdout) -> None:
    """Serve the sandbox alone until Ctrl-C, after printing the tokens it accepts."""
    tokens = [
        _token("full-access", frozenset({"create", "read", "update", "delete"})),
        _token("demo", DEMO_PERMISSIONS),
        _token("read-only", frozenset({"read"})),
    ]
    sock = _bind(host, port, "--port")
    url = f"http://{host}:{sock.getsockname()[1]}/api/v1"
    print(f"InvoisX sandbox on {url} ({rate_limit or 'no'} requests/minute per token)", file=out)
    print("Tokens it accepts (expire in a year):", file=out)
    for token in tokens:
        print(f"  {token.value}  {token.name}: {','.join(sorted(token.permissions))}", file=out)
    print(f"Try: INVOISX_API_URL={url} INVOISX_API_TOKEN=<a token> invoisx-proxy", file=out)
    out.flush()
    app = create_sandbox_app(tokens, rate_limit_per_minute=rate_limit)
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    run_until_signalled(uvicorn.Server(config), sockets=[sock])


def _intro(api_url: str, audit_path: Path) -> str:
    lines = [
        f"invoisx-proxy demo: the proxy listens on {api_url}",
        "in front of a local InvoisX sandbox. The proxy holds a sandbox token with read,",
        "create and update (not delete); clients never need it. Try, in another shell:",
        "",
        *(f"  {line}" for line in curl_lines(api_url)),
        "",
        f"Audit log: one JSON line per call, below and in {audit_path}",
        "(removed when the demo stops). `invoisx-proxy demo --tour` runs these steps itself.",
        "Ctrl-C stops the demo.",
        "",
    ]
    return "\n".join(lines)


def run_demo(port: int, *, tour: bool, host: str = "127.0.0.1", out: TextIO = sys.stdout) -> int:
    """Run sandbox + proxy; with `tour`, walk through them and return 0 only if all passed.

    `host` is the proxy's listen address (`0.0.0.0` in a container); the sandbox always stays
    on loopback, reachable only through the proxy.
    """
    token = _token("invoisx-proxy demo", DEMO_PERMISSIONS)
    proxy_socket = _bind(host, port, "--port")
    with tempfile.TemporaryDirectory(prefix="invoisx-proxy-demo-") as workdir, ExitStack() as stack:
        stack.callback(proxy_socket.close)
        sandbox = create_sandbox_app([token])
        sandbox_config = uvicorn.Config(sandbox, log_level="warning", lifespan="off")
        sandbox_url = stack.enter_context(serving_in_thread(sandbox_config, bind("127.0.0.1", 0)))
        audit_path = Path(workdir) / "audit.log"
        settings = load_settings(
            env_file=None,
            api_token=token.value,
            api_token_file=None,
            api_url=f"{sandbox_url}/api/v1",
            token_permissions=",".join(sorted(token.permissions)),
            token_expires_at=token.expires_at,
            host=host,
            port=port,
            # The token opens only this process's in-memory sandbox, so an address without
            # client keys puts nothing real at risk.
            allow_anonymous=True,
            config=None,
            log_file=audit_path,
        )
        app = create_app(settings, audit_to_stdout=not tour)
        config = server_config(app, settings, log_level="warning")
        proxy_url = stack.enter_context(serving_in_thread(config, proxy_socket))
        if tour:
            passed = run_tour(proxy_url, f"{sandbox_url}/api/v1", audit_path, token.value, out)
            return 0 if passed else 1
        print(_intro(f"{proxy_url}/api/v1", audit_path), file=out, flush=True)
        _wait_for_stop_signal()
        print("Stopping the demo.", file=out, flush=True)
    return 0
