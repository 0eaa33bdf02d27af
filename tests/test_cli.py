"""The `invoisx-proxy` command as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import TOKEN, ProxyProcess, Recorder, free_port, subprocess_env

COMMAND = [sys.executable, "-m", "proxy"]
ROOT = Path(__file__).resolve().parents[1]


def _one_line_exit_2(args: list[str], cwd: Path, **env: str) -> str:
    """Run the command; assert it exits 2 having printed one line and nothing else."""
    result = subprocess.run(
        [*COMMAND, *args],
        env=subprocess_env(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout) == (2, "")  # nothing logged as started
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize(
    ("env", "args", "line"),
    [
        ({}, [], "INVOISX_API_TOKEN: set it, or INVOISX_API_TOKEN_FILE"),
        (
            {"INVOISX_API_TOKEN": TOKEN, "INVOISX_TOKEN_PERMISSIONS": "read,admin"},
            ["serve"],
            "INVOISX_TOKEN_PERMISSIONS: unknown permission 'admin'",
        ),
        ({"INVOISX_API_TOKEN": TOKEN, "INVOISX_PROXY_PORT": "99999"}, [], "INVOISX_PROXY_PORT: "),
        (
            {"INVOISX_API_TOKEN": TOKEN},
            ["serve", "--config", "/nonexistent/proxy.toml"],
            "--config: cannot read /nonexistent/proxy.toml",
        ),
        (
            {"INVOISX_API_TOKEN": TOKEN, "INVOISX_PROXY_CONFIG": "/nonexistent/proxy.toml"},
            [],
            "INVOISX_PROXY_CONFIG: cannot read /nonexistent/proxy.toml",
        ),
        (
            {"INVOISX_API_TOKEN_FILE": "/nonexistent/token"},
            [],
            "INVOISX_API_TOKEN_FILE: cannot read /nonexistent/token",
        ),
        (
            {"INVOISX_API_TOKEN": TOKEN, "INVOISX_PROXY_LOG_FILE": "/nonexistent/dir/audit.log"},
            [],
            "INVOISX_PROXY_LOG_FILE: cannot open /nonexistent/dir/audit.log",
        ),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    tmp_path: Path, env: dict[str, str], args: list[str], line: str
) -> None:
    stderr = _one_line_exit_2(args, tmp_path, **env)
    assert stderr.startswith(f"invoisx-proxy: {line}")
    assert TOKEN not in stderr


@pytest.mark.parametrize(
    ("env", "args", "line"),
    [
        (
            {"INVOISX_API_TOKEN": TOKEN, "INVOISX_TOKEN_PERMISSIONS": f"read, {TOKEN}"},
            ["serve"],
            "INVOISX_TOKEN_PERMISSIONS: unknown permission (not shown: it may be a secret)",
        ),
        ({}, ["keys", "new", "app", "--permissions", TOKEN], "keys new: unknown permission (not"),
    ],
)
def test_a_token_pasted_as_a_permission_is_never_echoed(
    tmp_path: Path, env: dict[str, str], args: list[str], line: str
) -> None:
    result = subprocess.run(
        [*COMMAND, *args],
        env=subprocess_env(PYTHONPATH=str(ROOT), **env),  # this tree's code, not an installed copy
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert (result.stdout, result.stderr.count("\n")) == ("", 1)
    assert result.stderr.startswith(f"invoisx-proxy: {line}")
    assert TOKEN not in result.stdout + result.stderr


def test_serve_forwards_and_logs_json_until_sigterm(
    tmp_path: Path, recorder: tuple[Recorder, str]
) -> None:
    stand_in, upstream = recorder
    port = free_port()
    env = subprocess_env(INVOISX_API_TOKEN=TOKEN, INVOISX_API_URL=upstream)
    with subprocess.Popen(
        [*COMMAND, "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    response = httpx.get(f"http://127.0.0.1:{port}/api/v1/buyers?page=2")
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline and process.poll() is None
                    time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=15)
    assert response.status_code == 200
    assert stand_in.requests[-1].header("authorization") == [f"Bearer {TOKEN}"]
    assert process.returncode == 0
    lines = [json.loads(line) for line in output.splitlines()]
    events = [line["event"] for line in lines]
    assert "startup" in events and "shutdown" in events
    assert [line["status"] for line in lines if line["event"] == "request"] == [200]
    assert TOKEN not in output
    assert "page=2" not in output


def test_dotenv_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("INVOISX_API_TOKEN=x\nINVOISX_TOKEN_PERMISSIONS=read,root\n")
    result = subprocess.run(
        COMMAND, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "INVOISX_TOKEN_PERMISSIONS: unknown permission 'root'" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        ([], {"INVOISX_PROXY_PORT": "{taken}"}, "INVOISX_PROXY_PORT: cannot listen on"),
        (["--port", "{taken}"], {}, "--port: cannot listen on 127.0.0.1:{taken}: Address"),
        (["--port", "99999"], {}, "--port: "),
        (
            [],
            {"INVOISX_PROXY_HOST": "nosuch.invalid", "INVOISX_PROXY_ALLOW_ANONYMOUS": "true"},
            "INVOISX_PROXY_HOST: cannot resolve 'nosuch.invalid'",
        ),
        (
            ["--host", "192.0.2.1"],
            {"INVOISX_PROXY_ALLOW_ANONYMOUS": "true"},
            "--host: cannot listen on 192.0.2.1:8080: Cannot assign requested address",
        ),
        (["demo", "--port", "70000"], {}, "--port: 70000 is not a port (0-65535)"),
        (["demo", "--port", "{taken}"], {}, "--port: cannot listen on 127.0.0.1:{taken}"),
        (["demo", "--host", "nosuch.invalid"], {}, "--host: cannot resolve 'nosuch.invalid'"),
        (["sandbox", "--port", "-1"], {}, "--port: -1 is not a port (0-65535)"),
    ],
)
def test_a_start_up_that_cannot_listen_names_the_setting(
    tmp_path: Path, args: list[str], env: dict[str, str], line: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        fill = {name: value.replace("{taken}", port) for name, value in env.items()}
        stderr = _one_line_exit_2(
            [arg.replace("{taken}", port) for arg in args],
            tmp_path,
            **({"INVOISX_API_TOKEN": TOKEN} | fill),
        )
    assert stderr.startswith(f"invoisx-proxy: {line.replace('{taken}', port)}")


def test_an_expired_token_from_the_environment_does_not_start(tmp_path: Path) -> None:
    stderr = _one_line_exit_2(
        [], tmp_path, INVOISX_API_TOKEN=TOKEN, INVOISX_TOKEN_EXPIRES_AT="2026-01-31"
    )
    assert stderr.startswith(
        "invoisx-proxy: INVOISX_TOKEN_EXPIRES_AT: the token expired at 2026-02-01T00:00:00+08:00"
    )
    assert TOKEN not in stderr


def test_unknown_variables_and_default_permissions_are_warned_at_start_up(
    tmp_path: Path, spawn_proxy: Callable[..., ProxyProcess], recorder: tuple[Recorder, str]
) -> None:
    (tmp_path / ".env").write_text(f"INVOISX_RETRY_MAXIMUM=3\nINVOISX_API_TOKEN={TOKEN}\n")
    proxy = spawn_proxy(INVOISX_API_URL=recorder[1], INVOISX_TOKEN_PERMISSION="read,create")
    proxy.wait_for("default_permissions")
    warnings = {
        line["variable"]: line for line in proxy.lines() if line["event"] == "unknown_setting"
    }
    assert {name: line["did_you_mean"] for name, line in warnings.items()} == {
        "INVOISX_TOKEN_PERMISSION": "INVOISX_TOKEN_PERMISSIONS",
        "INVOISX_RETRY_MAXIMUM": "INVOISX_RETRY_MAX",
    }
    assert warnings["INVOISX_RETRY_MAXIMUM"]["source"] == ".env"
    assert all(line["level"] == "warning" for line in warnings.values())
    # The proxy runs with what it says: read only.
    assert httpx.post(f"{proxy.url}/api/v1/buyers", json={}).status_code == 403
    assert proxy.stop() == 0
    assert "read,create" not in proxy.output_path.read_text()  # values are never repeated


def test_permissions_that_were_set_are_not_warned_about(
    spawn_proxy: Callable[..., ProxyProcess], recorder: tuple[Recorder, str]
) -> None:
    proxy = spawn_proxy(
        INVOISX_API_TOKEN=TOKEN, INVOISX_API_URL=recorder[1], INVOISX_TOKEN_PERMISSIONS="read"
    )
    startup = proxy.wait_for("startup")
    assert startup["listen"] == f"127.0.0.1:{proxy.port}"
    assert proxy.stop() == 0
    events = [line["event"] for line in proxy.lines()]
    assert "default_permissions" not in events and "unknown_setting" not in events
