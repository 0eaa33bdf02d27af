"""Per-app client keys: who may call, with which permissions, and the open-proxy guard."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from proxy.config.configfile import build_config, load_config_file
from proxy.config.keys import config_block, key_sha256
from proxy.config.settings import ConfigError, load_settings
from tests.conftest import (
    DOCUMENT_TYPES,
    TOKEN,
    ProxyProcess,
    Recorder,
    RunningProxy,
    subprocess_env,
)

BILLING_KEY = "ipk_billing_0123456789abcdefghijklmnopqrstuv"
REPORTS_KEY = "ipk_reports_0123456789abcdefghijklmnopqrstuv"
ROOT = Path(__file__).resolve().parents[2]
# Three polls at 0.05 s: a watch that applied a half-written file would have by now; the
# proxy waits for a file to read the same for 0.5 s (`proxy.watch.SETTLE_SECONDS`).
HALF_WRITTEN_FOR = 0.15
BILLING_MAY_UPDATE = config_block("billing-job", BILLING_KEY, ["read", "create", "update"])
# Listed last, as an operator appends a rule: a file cut short loads without it.
CANCEL_NEEDS_DELETE = (
    '[[rules]]\nmethod = "POST"\npath = "/invoices/*/cancel"\npermission = "delete"\n'
)


def _write_clients(path: Path, *blocks: str) -> Path:
    path.write_text("\n".join(blocks))
    return path


def _proxy(
    tmp_path: Path, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> RunningProxy:
    config = _write_clients(
        tmp_path / "proxy.toml",
        config_block("billing-job", BILLING_KEY, ["read", "create"]),
        config_block("reports", REPORTS_KEY, ["read"]),
    )
    return start_proxy(recorder[1], config=config, token_permissions="read,update")


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "A client key is required"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "A client key is required"),
        (_bearer("ipk_not_a_known_key"), "not known"),
        (_bearer(BILLING_KEY[:-1]), "not known"),
        (_bearer(BILLING_KEY.upper()), "not known"),
        (_bearer(key_sha256(BILLING_KEY)), "not known"),  # the hash itself is no key
        ({"X-Proxy-Key": "ipk_wrong", **_bearer(BILLING_KEY)}, "not known"),
    ],
)
def test_calls_without_a_known_key_get_401_and_never_reach_invoisx(
    tmp_path: Path,
    recorder: tuple[Recorder, str],
    start_proxy: Callable[..., RunningProxy],
    headers: dict[str, str],
    message: str,
) -> None:
    proxy = _proxy(tmp_path, recorder, start_proxy)
    response = httpx.get(f"{proxy.url}/api/v1/buyers", headers=headers)
    assert response.status_code == 401
    body = response.json()
    assert (body["success"], body["error_code"]) == (False, "UNAUTHORIZED")
    assert message in body["message"]
    assert recorder[0].requests == []
    line = proxy.audit_of(response)
    assert (line["client"], line["decision"], line["status"]) == ("unknown", "denied", 401)


@pytest.mark.parametrize(
    "headers", [_bearer(BILLING_KEY), {"X-Proxy-Key": BILLING_KEY}, {"x-proxy-key": BILLING_KEY}]
)
def test_a_known_key_calls_with_the_server_token_and_is_named_in_the_audit(
    tmp_path: Path,
    recorder: tuple[Recorder, str],
    start_proxy: Callable[..., RunningProxy],
    headers: dict[str, str],
) -> None:
    proxy = _proxy(tmp_path, recorder, start_proxy)
    response = httpx.get(f"{proxy.url}/api/v1/buyers", headers=headers)
    assert response.status_code == 200
    seen = recorder[0].requests[-1]
    assert seen.header("authorization") == [f"Bearer {TOKEN}"]
    assert seen.header("x-proxy-key") == []
    line = proxy.audit_of(response)
    assert (line["client"], line["peer"]) == ("billing-job", "127.0.0.1")
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert 'client="billing-job"' in metrics
    everything = proxy.log_path.read_text() + metrics + response.text
    assert BILLING_KEY not in everything and TOKEN not in everything


@pytest.mark.parametrize(
    ("key", "method", "path", "status", "missing"),
    [
        # billing-job: read, create. The token: read, update.
        (BILLING_KEY, "GET", "/buyers", 200, None),
        (BILLING_KEY, "POST", "/buyers", 403, ["token"]),
        (BILLING_KEY, "PUT", "/buyers/b1", 403, ["client"]),
        (BILLING_KEY, "DELETE", "/buyers/b1", 403, ["token", "client"]),
        (BILLING_KEY, "POST", "/invoices/i1/submit", 403, ["client"]),
        (REPORTS_KEY, "GET", "/invoices", 200, None),
        (REPORTS_KEY, "PUT", "/buyers/b1", 403, ["client"]),
    ],
)
def test_effective_permissions_are_the_intersection(
    tmp_path: Path,
    recorder: tuple[Recorder, str],
    start_proxy: Callable[..., RunningProxy],
    key: str,
    method: str,
    path: str,
    status: int,
    missing: list[str] | None,
) -> None:
    proxy = _proxy(tmp_path, recorder, start_proxy)
    response = httpx.request(method, f"{proxy.url}/api/v1{path}", headers=_bearer(key), json={})
    assert response.status_code == status
    if missing is None:
        assert len(recorder[0].requests) == 1
        return
    assert recorder[0].requests == []
    body = response.json()
    assert body["error_code"] == "FORBIDDEN"
    assert body["missing_from"] == missing
    assert ("InvoisX token lacks" in body["message"]) == ("token" in missing)
    assert ("client's key lacks" in body["message"]) == ("client" in missing)


def test_config_holds_only_hashes(tmp_path: Path) -> None:
    block = config_block("billing-job", BILLING_KEY, ["read"])
    assert BILLING_KEY not in block and key_sha256(BILLING_KEY) in block


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('[clients.a]\nkey_sha256 = "abc"\npermissions = ["read"]', "clients.a.key_sha256"),
        (f'[clients.a]\nkey_sha256 = "{"a" * 64}"\npermissions = ["root"]', "unknown permission"),
        (f'[clients.a]\nkey_sha256 = "{"a" * 64}"\npermissions = []', "at least one"),
        (f'[clients.anonymous]\nkey_sha256 = "{"a" * 64}"\npermissions = ["read"]', "not 'a"),
        (
            f'[clients.a]\nkey_sha256 = "{"a" * 64}"\npermissions = ["read"]\n'
            f'[clients.b]\nkey_sha256 = "{"A" * 64}"\npermissions = ["read"]',
            "share one key_sha256",
        ),
        (f'[clients.a]\nkey = "{BILLING_KEY}"\npermissions = ["read"]', "clients.a.key"),
        (
            f'[clients.a]\nkey_sha256 = "{"a" * 64}"\npermissions = ["read", "{BILLING_KEY}"]',
            "unknown permission (not shown",
        ),
        (f'[clients.a]\nkey_sha256 = "{"a" * 64}"\npermissions = "read"', "must be a list"),
        (f'[clients.a]\nkey_sha256 = "{"a" * 64}"\npermissions = 5', "must be a list"),
        (f'[clients.a]\nkey_sha256 = "{"a" * 64}"\npermissions = [5]', "are names"),
    ],
)
def test_bad_client_tables_name_the_problem(tmp_path: Path, toml: str, problem: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    assert str(caught.value).startswith("INVOISX_PROXY_CONFIG: ")
    assert problem in str(caught.value)
    assert BILLING_KEY not in str(caught.value)


def test_open_proxy_off_loopback_needs_explicit_consent(tmp_path: Path) -> None:
    settings = load_settings(env_file=None, api_token=TOKEN, host="0.0.0.0")
    with pytest.raises(ConfigError) as caught:
        build_config(load_config_file(None), settings)
    assert caught.value.setting == "INVOISX_PROXY_ALLOW_ANONYMOUS"
    allowed = load_settings(env_file=None, api_token=TOKEN, host="0.0.0.0", allow_anonymous=True)
    assert len(build_config(load_config_file(None), allowed).clients) == 0
    keys = _write_clients(tmp_path / "proxy.toml", config_block("a", BILLING_KEY, ["read"]))
    keyed = load_settings(env_file=None, api_token=TOKEN, host="0.0.0.0", config=keys)
    assert len(build_config(load_config_file(keys), keyed).clients) == 1
    loopback = load_settings(env_file=None, api_token=TOKEN)
    assert len(build_config(load_config_file(None), loopback).clients) == 0


def test_serve_refuses_to_start_open_on_all_interfaces(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--host", "0.0.0.0", "--port", "0"],
        env=subprocess_env(INVOISX_API_TOKEN=TOKEN),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("invoisx-proxy: INVOISX_PROXY_ALLOW_ANONYMOUS: listening on")


def test_config_reload_adds_keys_and_a_bad_file_keeps_the_last_good(
    tmp_path: Path, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    path = _write_clients(
        tmp_path / "proxy.toml", config_block("billing-job", BILLING_KEY, ["read"])
    )
    proxy = start_proxy(recorder[1], config=path, reload_interval=0.05)
    url = f"{proxy.url}/api/v1/buyers"
    assert httpx.get(url, headers=_bearer(REPORTS_KEY)).status_code == 401

    _write_clients(
        path,
        config_block("billing-job", BILLING_KEY, ["read"]),
        config_block("reports", REPORTS_KEY, ["read"]),
    )
    assert len(proxy.wait_for_events("config_reloaded", 1)) == 1
    assert httpx.get(url, headers=_bearer(REPORTS_KEY)).status_code == 200

    path.write_text("[clients.reports\nbroken")
    failed = proxy.wait_for_events("config_reload_failed", 1)
    assert len(failed) == 1
    assert httpx.get(url, headers=_bearer(REPORTS_KEY)).status_code == 200
    assert "is not valid TOML" in failed[0]["reason"]
    assert REPORTS_KEY not in proxy.log_path.read_text()


def test_reload_cannot_open_a_proxy_listening_beyond_loopback(
    tmp_path: Path, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    path = _write_clients(
        tmp_path / "proxy.toml", config_block("billing-job", BILLING_KEY, ["read"])
    )
    # Settings say 0.0.0.0 (the tests still serve on loopback): the guard must hold on reload.
    proxy = start_proxy(recorder[1], config=path, reload_interval=0.05, host="0.0.0.0")
    path.write_text("# every client removed\n")
    failed = proxy.wait_for_events("config_reload_failed", 1)
    assert len(failed) == 1
    assert failed[0]["reason"].startswith("INVOISX_PROXY_ALLOW_ANONYMOUS:")
    url = f"{proxy.url}/api/v1/buyers"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=_bearer(BILLING_KEY)).status_code == 200


def test_a_token_pasted_into_a_reloaded_config_is_not_logged(
    tmp_path: Path, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    path = _write_clients(
        tmp_path / "proxy.toml", config_block("billing-job", BILLING_KEY, ["read"])
    )
    proxy = start_proxy(recorder[1], config=path, reload_interval=0.05)
    _write_clients(path, config_block("billing-job", BILLING_KEY, ["read", TOKEN]))
    failed = proxy.wait_for_events("config_reload_failed", 1)
    assert "clients.billing-job.permissions: unknown permission (not shown" in failed[0]["reason"]
    assert TOKEN not in proxy.log_path.read_text()
    url = f"{proxy.url}/api/v1/buyers"
    assert httpx.get(url, headers=_bearer(BILLING_KEY)).status_code == 200


def test_document_actions_need_update_for_every_document_type(
    tmp_path: Path, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    config = _write_clients(
        tmp_path / "proxy.toml", config_block("issuer", BILLING_KEY, ["create"])
    )
    proxy = start_proxy(recorder[1], config=config)
    for kind in DOCUMENT_TYPES:
        for action in ("validate", "submit", "cancel"):
            url = f"{proxy.url}/api/v1/{kind}/d1/{action}"
            response = httpx.post(url, headers=_bearer(BILLING_KEY), json={})
            assert response.status_code == 403, url
            body = response.json()
            assert (body["error_code"], body["required_permission"]) == ("FORBIDDEN", "update")
            assert body["missing_from"] == ["client"]
    assert recorder[0].requests == []
    created = httpx.post(f"{proxy.url}/api/v1/credit-notes", headers=_bearer(BILLING_KEY), json={})
    assert created.status_code == 200
    assert [request.raw_path for request in recorder[0].requests] == [b"/api/v1/credit-notes"]


def _rewrite_in_two_bursts(path: Path, between: Callable[[], None]) -> None:
    """Rewrite `path` in place, adding a client; `between` runs when only the part before the
    rule is written: valid TOML that would drop the rule."""
    full = "\n".join(
        [BILLING_MAY_UPDATE, config_block("reports", REPORTS_KEY, ["read"]), CANCEL_NEEDS_DELETE]
    )
    half = full[: full.index("[[rules]]")]
    with path.open("w") as file:
        file.write(half)
        file.flush()
        between()
        file.write(full[len(half) :])


def _cancel(url: str) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/invoices/i1/cancel", headers=_bearer(BILLING_KEY))


def _refused_as_the_old_config(url: str) -> None:
    time.sleep(HALF_WRITTEN_FOR)
    response = _cancel(url)
    assert response.status_code == 403, "the half-written file, without its rule, is in force"
    assert response.json()["required_permission"] == "delete"


def test_a_config_rewritten_in_place_applies_only_once_complete(
    tmp_path: Path, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    path = _write_clients(tmp_path / "proxy.toml", BILLING_MAY_UPDATE, CANCEL_NEEDS_DELETE)
    proxy = start_proxy(recorder[1], config=path, reload_interval=0.05)
    assert _cancel(proxy.url).status_code == 403

    _rewrite_in_two_bursts(path, lambda: _refused_as_the_old_config(proxy.url))
    proxy.wait_for_events("config_reloaded", 1)
    assert httpx.get(f"{proxy.url}/api/v1/buyers", headers=_bearer(REPORTS_KEY)).status_code == 200
    assert _cancel(proxy.url).status_code == 403
    time.sleep(1)  # twice the settling: time for a second reload
    reloads = [(line["clients"], line["rules"]) for line in proxy.events("config_reloaded")]
    assert reloads == [(2, 1)]
    assert proxy.events("config_reload_failed") == []
    assert [request.method for request in recorder[0].requests] == ["GET"]


def test_sighup_does_not_apply_a_config_mid_write(
    tmp_path: Path, recorder: tuple[Recorder, str], spawn_proxy: Callable[..., ProxyProcess]
) -> None:
    path = _write_clients(tmp_path / "proxy.toml", BILLING_MAY_UPDATE, CANCEL_NEEDS_DELETE)
    proxy = spawn_proxy(
        INVOISX_API_TOKEN=TOKEN,
        INVOISX_API_URL=recorder[1],
        INVOISX_TOKEN_PERMISSIONS="create,read,update,delete",
        INVOISX_PROXY_CONFIG=str(path),
        INVOISX_PROXY_RELOAD_INTERVAL="3600",  # only SIGHUP reads the file
        PYTHONPATH=str(ROOT),  # this tree's code, not a copy installed in the venv
    )

    def signal_then_call() -> None:
        proxy.process.send_signal(signal.SIGHUP)
        _refused_as_the_old_config(proxy.url)

    _rewrite_in_two_bursts(path, signal_then_call)
    reloaded = proxy.wait_for("config_reloaded", timeout=3)
    assert (reloaded["clients"], reloaded["rules"]) == (2, 1)
    assert httpx.get(f"{proxy.url}/api/v1/buyers", headers=_bearer(REPORTS_KEY)).status_code == 200
    assert _cancel(proxy.url).status_code == 403
    assert [line["event"] for line in proxy.lines()].count("config_reloaded") == 1
    assert proxy.stop() == 0


@pytest.mark.parametrize(
    ("tables", "problem"),
    [
        (
            config_block("a", BILLING_KEY, ["read"]) + "reserved_per_minute = 40\n"
            + config_block("b", "ipk_second_app_key_0123456789", ["read"])
            + "reserved_per_minute = 30\n",
            "reserved_per_minute add up to 70, more than the token's limit of 60",
        ),
        (
            config_block("a", BILLING_KEY, ["read"])
            + "requests_per_minute = 5\nreserved_per_minute = 10\n",
            "reserved_per_minute (10) is more than requests_per_minute (5)",
        ),
    ],
    ids=["more-than-the-token", "more-than-the-app-may"],
)  # fmt: skip
def test_reservations_must_fit_the_limits(tmp_path: Path, tables: str, problem: str) -> None:
    path = _write_clients(tmp_path / "proxy.toml", tables)
    settings = load_settings(env_file=None, api_token=TOKEN, config=path)
    with pytest.raises(ConfigError) as caught:
        build_config(load_config_file(path), settings)
    assert caught.value.setting == "INVOISX_PROXY_CONFIG"
    assert problem in str(caught.value)
    fits = _write_clients(
        tmp_path / "fits.toml",
        config_block("a", BILLING_KEY, ["read"]) + "reserved_per_minute = 60\n",
    )
    config = build_config(load_config_file(fits), load_settings(env_file=None, api_token=TOKEN))
    assert dict(config.clients.reservations) == {"a": 60}
