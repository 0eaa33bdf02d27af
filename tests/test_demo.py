"""`invoisx-proxy demo` and `invoisx-proxy sandbox`, run as a user runs them."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from proxy.tour import run_tour
from tests.conftest import RunningProxy, Sandbox, free_port

COMMAND = [sys.executable, "-m", "proxy"]


def _refuses(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _env() -> dict[str, str]:
    # A stray setting in the developer's shell must not change the demo.
    env = {key: value for key, value in os.environ.items() if not key.startswith("INVOISX_")}
    return env | {"INVOISX_TOKEN_EXPIRES_AT": "2000-01-01", "INVOISX_PROXY_CONFIG": "/nope"}


@contextmanager
def _running(args: list[str], until: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Start the command; yield it with its output lines up to and including `until`."""
    with subprocess.Popen(
        [*COMMAND, *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        lines: list[str] = []
        try:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line.rstrip("\n"))
                if until in line:
                    break
            assert lines and until in lines[-1], "\n".join(lines)
            yield process, lines
        finally:
            if process.poll() is None:
                process.kill()


def test_tour_passes(tmp_path: object) -> None:
    result = subprocess.run(
        [*COMMAND, "demo", "--tour", "--port", str(free_port())],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Tour passed: 9 calls, 0 not as expected." in result.stdout
    assert "FAIL" not in result.stdout
    assert re.search(r"ok +refused by the proxy +403  DELETE /api/v1/buyers/", result.stdout)
    assert "1 denied, 7 forwarded; the token appears nowhere" in result.stdout
    assert "ixs_" not in result.stdout + result.stderr


def test_demo_serves_until_ctrl_c_then_exits_0() -> None:
    port = free_port()
    with _running(["demo", "--port", str(port)], until="Ctrl-C stops the demo.") as (
        process,
        lines,
    ):
        text = "\n".join(lines)
        assert f"API=http://127.0.0.1:{port}/api/v1" in text
        assert "curl -s -X DELETE $API/buyers/$BUYER" in text
        assert "ixs_" not in text
        startup = json.loads(next(line for line in lines if '"startup"' in line))
        sandbox_port = int(startup["upstream"].split(":")[2].split("/")[0])
        response = httpx.get(f"http://127.0.0.1:{port}/api/v1/buyers")
        assert response.status_code == 200
        assert response.json()["meta"]["total"] == 0
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=15)
        assert process.returncode == 0
        assert "Traceback" not in output
    assert '"event":"request"' in output  # the audit line of the call above
    assert _refuses(port) and _refuses(sandbox_port)


def test_demo_port_in_use_exits_2_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*COMMAND, "demo", "--port", str(port)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert result.stderr == (
        f"invoisx-proxy: --port: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


def test_sandbox_command_prints_working_tokens() -> None:
    port = free_port()
    with _running(["sandbox", "--port", str(port), "--rate-limit", "5"], until="Try:") as (
        process,
        lines,
    ):
        assert lines[0] == (
            f"InvoisX sandbox on http://127.0.0.1:{port}/api/v1 (5 requests/minute per token)"
        )
        tokens = dict(
            re.fullmatch(r"  (ixs_\S+)  (\S+): \S+", line).group(2, 1)  # type: ignore[union-attr]
            for line in lines[2:5]
        )
        assert set(tokens) == {"full-access", "demo", "read-only"}
        headers = {"Authorization": f"Bearer {tokens['read-only']}", "Accept": "application/json"}
        url = f"http://127.0.0.1:{port}/api/v1/buyers"
        response = httpx.get(url, headers=headers)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit"] == "5"
        assert httpx.post(url, headers=headers, json={}).status_code == 403
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0
    assert _refuses(port)


def test_tour_reports_failure_when_the_proxy_would_allow_delete(
    start_sandbox_upstream: Callable[..., Sandbox],
    start_proxy: Callable[..., RunningProxy],
) -> None:
    sandbox = start_sandbox_upstream(rate_limit_per_minute=0)
    proxy = start_proxy(sandbox.url, api_token=sandbox.token.value)
    out = io.StringIO()
    assert run_tour(proxy.url, sandbox.url, proxy.log_path, sandbox.token.value, out) is False
    assert re.search(r"FAIL refused by the proxy .* 204  DELETE", out.getvalue())
    assert "Tour FAILED" in out.getvalue()


@pytest.mark.parametrize("leak", [True, False])
def test_tour_checks_the_audit_log_for_the_token(
    start_sandbox_upstream: Callable[..., Sandbox],
    start_proxy: Callable[..., RunningProxy],
    leak: bool,
) -> None:
    sandbox = start_sandbox_upstream(permissions="create,read,update", rate_limit_per_minute=0)
    proxy = start_proxy(
        sandbox.url, api_token=sandbox.token.value, token_permissions="create,read,update"
    )
    if leak:
        with proxy.log_path.open("a") as log:
            log.write(json.dumps({"event": "leak", "value": sandbox.token.value}) + "\n")
    out = io.StringIO()
    assert run_tour(proxy.url, sandbox.url, proxy.log_path, sandbox.token.value, out) is not leak
