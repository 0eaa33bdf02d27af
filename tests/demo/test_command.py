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
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from proxy.demo.tour import BUYER, run_tour
from tests.conftest import RunningProxy, Sandbox, free_port, subprocess_env

COMMAND = [sys.executable, "-m", "proxy"]


def _refuses(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _env() -> dict[str, str]:
    # A stray setting in the developer's shell must not change the demo.
    env = {key: value for key, value in os.environ.items() if not key.startswith("INVOISX_")}
    return env | {"INVOISX_TOKEN_EXPIRES_AT": "2000-01-01", "INVOISX_PROXY_CONFIG": "/nope"}


@contextmanager
def _running(
    args: list[str], until: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Start the command; yield it with its output lines up to and including `until`."""
    with subprocess.Popen(
        [*COMMAND, *args],
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        lines: list[str] = []
        # A command that never prints `until` (or a test that waits for more) must not hang
        # the suite: killed, its output ends and the test fails.
        watchdog = threading.Timer(60, process.kill)
        watchdog.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line.rstrip("\n"))
                if until in line:
                    break
            assert lines and until in lines[-1], "\n".join(lines)
            yield process, lines
        finally:
            watchdog.cancel()
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
    # Then what `invoisx-proxy audit` says of those calls.
    report = result.stdout[result.stdout.index("Tour passed") :]
    assert "InvoisX proxy audit: 8 requests from 1 client" in report
    assert "Decisions: forwarded 7, denied 1" in report


def test_demo_serves_until_ctrl_c_then_exits_0() -> None:
    port = free_port()
    with _running(["demo", "--port", str(port)], until="Ctrl-C stops the demo.") as (
        process,
        lines,
    ):
        text = "\n".join(lines)
        temporary_log = Path(re.findall(r"below and in (\S+)", text)[0])
        assert temporary_log.is_file()
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
    assert not temporary_log.exists()


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


# The last of the sandbox's lines: the proxy line for its read-only token.
SANDBOX_READY = "INVOISX_TOKEN_PERMISSIONS=read "


def test_sandbox_command_prints_working_tokens() -> None:
    port = free_port()
    with _running(["sandbox", "--port", str(port), "--rate-limit", "5"], until=SANDBOX_READY) as (
        process,
        lines,
    ):
        assert lines[0] == (
            f"InvoisX sandbox on http://127.0.0.1:{port}/api/v1 (5 requests/minute per token)"
        )
        listed = (re.fullmatch(r"  (ixs_\S+)  (\S+): \S+", line) for line in lines[2:5])
        tokens = {match[2]: match[1] for match in listed if match}
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


def _serve_lines(lines: list[str]) -> dict[str, str]:
    """The sandbox's paste-ready proxy lines, by the permissions they give the proxy."""
    found = (re.search(r"INVOISX_TOKEN_PERMISSIONS=(\S+)", line) for line in lines)
    return {match[1]: match.string.strip() for match in found if match}


def _wait_until_answering(url: str, process: subprocess.Popen[bytes], output: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, output.read_text()
        assert time.monotonic() < deadline, output.read_text()
        time.sleep(0.05)


def test_a_pasted_sandbox_line_runs_a_proxy_with_that_tokens_permissions(tmp_path: Path) -> None:
    sandbox_port, proxy_port = free_port(), free_port()
    with _running(["sandbox", "--port", str(sandbox_port)], until=SANDBOX_READY) as (
        sandbox,
        lines,
    ):
        line = _serve_lines(lines)["create,delete,read,update"]
        # Pasted elsewhere: another directory, no venv on PATH, a stale expiry in the shell.
        env = subprocess_env(
            PATH="/usr/bin:/bin",
            INVOISX_PROXY_PORT=str(proxy_port),
            INVOISX_TOKEN_EXPIRES_AT="2000-01-01",
        )
        output = tmp_path / "proxy.out"
        with (
            output.open("wb") as out,
            subprocess.Popen(
                line,
                shell=True,
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=out,
                start_new_session=True,
            ) as proxy,
        ):
            try:
                _wait_until_answering(f"http://127.0.0.1:{proxy_port}/healthz", proxy, output)
                api = f"http://127.0.0.1:{proxy_port}/api/v1"
                created = httpx.post(f"{api}/buyers", json=BUYER)
                assert created.status_code == 201, created.text
                deleted = httpx.delete(f"{api}/buyers/{created.json()['data']['id']}")
                assert deleted.status_code == 204, deleted.text
            finally:
                # The shell and the proxy it started: the session started for them.
                os.killpg(proxy.pid, signal.SIGTERM)
                proxy.wait(15)
        sandbox.send_signal(signal.SIGINT)
        assert sandbox.wait(15) == 0
    startup = json.loads(next(x for x in output.read_text().splitlines() if '"startup"' in x))
    assert startup["token_permissions"] == ["create", "delete", "read", "update"]
    expires_in = datetime.fromisoformat(startup["token_expires_at"]) - datetime.now(UTC)
    assert timedelta(days=364) < expires_in <= timedelta(days=365)


def test_demo_log_file_is_kept_for_invoisx_proxy_audit(tmp_path: Path) -> None:
    log, port = tmp_path / "demo.log", free_port()
    args = ["demo", "--port", str(port), "--log-file", str(log)]
    with _running(args, until="Ctrl-C stops the demo.") as (process, lines):
        hint = next(line for line in lines if line.endswith(f" audit {log}` reports on it."))
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/buyers").status_code == 200
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=15)
        assert process.returncode == 0
    assert f"Stopping the demo; the audit log stays in {log}." in output
    # The command as printed, pasted from elsewhere: the venv need not be on PATH.
    report = subprocess.run(
        hint.split("`")[1],
        shell=True,
        cwd="/",
        env=_env() | {"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert report.returncode == 0, report.stderr
    assert report.stdout.startswith("InvoisX proxy audit: 1 request from 1 client")


def _tour(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [*COMMAND, "demo", "--tour", "--port", str(free_port()), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_tour_appends_to_the_environments_log_file_and_reports_only_its_own_calls(
    tmp_path: Path,
) -> None:
    log = tmp_path / "kept.log"
    for runs in (1, 2):
        result = _tour(_env() | {"INVOISX_PROXY_LOG_FILE": str(log)})
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 denied, 7 forwarded; the token appears nowhere" in result.stdout
        assert "InvoisX proxy audit: 8 requests from 1 client" in result.stdout
        requests = [line for line in log.read_text().splitlines() if '"event":"request"' in line]
        assert len(requests) == 8 * runs


def test_log_file_flag_wins_over_the_environment(tmp_path: Path) -> None:
    flag, variable = tmp_path / "flag.log", tmp_path / "variable.log"
    result = _tour(_env() | {"INVOISX_PROXY_LOG_FILE": str(variable)}, "--log-file", str(flag))
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"event":"request"' in flag.read_text()
    assert not variable.exists()


@pytest.mark.parametrize("given_as", ["--log-file", "INVOISX_PROXY_LOG_FILE"])
def test_a_log_file_that_cannot_be_opened_exits_2_naming_it(tmp_path: Path, given_as: str) -> None:
    path = tmp_path / "no-such-directory" / "demo.log"
    args = ["demo", "--port", str(free_port())]
    env = _env()
    if given_as == "--log-file":
        args += ["--log-file", str(path)]
    else:
        env[given_as] = str(path)
    result = subprocess.run([*COMMAND, *args], env=env, capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"invoisx-proxy: {given_as}: cannot open {path}: No such file or directory\n"
    )


def test_a_client_leaving_mid_call_puts_no_traceback_in_the_demo_output() -> None:
    port = free_port()
    with _running(["demo", "--port", str(port)], until="Ctrl-C stops the demo.") as (process, _):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(
                f"POST /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
                + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                + b'{"name": "Syarik'
            )
            # Long enough for the proxy to pass the head and the first bytes on to the
            # sandbox, which is then left waiting for the rest.
            time.sleep(0.5)
        assert process.stdout is not None
        audit = next(json.loads(line) for line in process.stdout if '"event":"request"' in line)
        assert (audit["status"], audit["error_code"]) == (400, "CLIENT_BODY_INCOMPLETE")
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=15)
        assert process.returncode == 0
    assert "Exception in ASGI application" not in output
    assert "Traceback" not in output


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
