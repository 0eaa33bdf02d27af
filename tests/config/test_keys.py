"""`invoisx-proxy keys`: a new key shown once with its config table, and hashing a key."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from proxy.config.keys import KEY_PREFIX, key_sha256
from tests.conftest import Recorder, RunningProxy, subprocess_env

COMMAND = [sys.executable, "-m", "proxy", "keys"]


def _run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        input=stdin,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_new_key_and_its_table_let_the_app_in(
    tmp_path: Path, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    result = _run("new", "billing-job", "--permissions", "read,create")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    key = lines[1]
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    table = result.stdout[result.stdout.index("[clients.billing-job]") :]
    assert key not in table
    assert f'key_sha256 = "{key_sha256(key)}"' in table
    assert 'permissions = ["create", "read"]' in table
    config = tmp_path / "proxy.toml"
    config.write_text(table)
    proxy = start_proxy(recorder[1], config=config)
    response = httpx.get(f"{proxy.url}/api/v1/buyers", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert proxy.audit_of(response)["client"] == "billing-job"


def test_each_key_the_command_prints_is_new_and_long() -> None:
    keys = [_run("new", "app", "--permissions", "read").stdout.splitlines()[1] for _ in range(3)]
    assert len(set(keys)) == 3
    for key in keys:
        # 256 random bits, URL-safe base64: 43 characters after the prefix.
        assert re.fullmatch(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{43}", key), key


def test_hash_reads_the_key_on_stdin() -> None:
    result = _run("hash", stdin="ipk_example_key\n")
    assert (result.returncode, result.stdout) == (0, key_sha256("ipk_example_key") + "\n")
    empty = _run("hash", stdin="")
    assert empty.returncode == 2
    assert empty.stderr == "invoisx-proxy: keys hash: no key on standard input\n"


def test_new_refuses_bad_names_and_permissions() -> None:
    for args, problem in (
        (("new", "billing job", "--permissions", "read"), "client name 'billing job'"),
        (("new", "anonymous", "--permissions", "read"), "client name 'anonymous'"),
        (("new", "ok", "--permissions", "read,admin"), "unknown permission 'admin'"),
    ):
        result = _run(*args)
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.startswith(f"invoisx-proxy: keys new: {problem}")
        assert result.stderr.count("\n") == 1


def test_hash_takes_a_key_pasted_with_its_bearer_prefix() -> None:
    expected = key_sha256("ipk_example_key") + "\n"
    for pasted in ("Bearer ipk_example_key\n", "bearer  ipk_example_key \n"):
        assert _run("hash", stdin=pasted).stdout == expected
    assert _run("hash", stdin="Bearer \n").returncode == 2  # a scheme alone is no key
