"""The `invoisx-proxy` command as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TOKEN, Recorder, free_port, subprocess_env

COMMAND = [sys.executable, "-m", "proxy"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("env", "args", "line"),
    [
        ({}, [], "INVOISX_API_TOKEN: set it, or INVOISX_API_TOKEN_FILE"),
        (
            {"INVOISX_API_TOKEN": TOKEN, "INVOISX_TOKEN_PERMISSIONS": "read,admin"},
            ["serve"],
            "INVOISX_TOKEN_PERMISSIONS: unknown permission 'admin'",
        ),
        ({"INVOISX_API_TOKEN": TOKEN}, ["--port", "99999"], "INVOISX_PROXY_PORT: "),
        (
            {"INVOISX_API_TOKEN": TOKEN},
            ["serve", "--config", "/nonexistent/proxy.toml"],
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
    result = subprocess.run(
        [*COMMAND, *args],
        env=subprocess_env(**env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"invoisx-proxy: {line}")
    assert "Traceback" not in result.stderr
    assert TOKEN not in result.stderr


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
