"""`/healthz` and `/readyz`: liveness never touches InvoisX; readiness follows the token."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from proxy.credentials import fingerprint
from proxy.settings import ConfigError, load_settings
from tests.conftest import TOKEN, Recorded, Recorder, Reply, RunningProxy


def _refusal(status: int, code: str) -> Reply:
    body = f'{{"success":false,"message":"No.","error_code":"{code}"}}'.encode()
    return Reply(status, chunks=(body,))


def test_ready_until_invoisx_rejects_the_token(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    proxy = start_proxy(upstream)
    ready = httpx.get(f"{proxy.url}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "token_fingerprint": fingerprint(TOKEN)}

    # A permission refusal is about one call, not the token: still ready.
    stand_in.reply = lambda request: _refusal(403, "FORBIDDEN")
    assert httpx.post(f"{proxy.url}/api/v1/buyers", json={}).status_code == 403
    assert httpx.get(f"{proxy.url}/readyz").status_code == 200

    stand_in.reply = lambda request: _refusal(401, "UNAUTHORIZED")
    for _ in range(2):
        assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 401
    not_ready = httpx.get(f"{proxy.url}/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json() == {
        "status": "unavailable",
        "reason": "token_rejected",
        "token_fingerprint": fingerprint(TOKEN),
    }
    # Logged once, when the verdict changed, not on every refused call.
    rejected = [line for line in proxy.log_lines() if line["event"] == "token_rejected"]
    assert len(rejected) == 1
    assert (rejected[0]["status"], rejected[0]["error_code"]) == (401, "UNAUTHORIZED")
    assert httpx.get(f"{proxy.url}/healthz").status_code == 200


def test_company_access_denied_also_rejects_the_token(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = lambda request: _refusal(403, "COMPANY_ACCESS_DENIED")
    proxy = start_proxy(upstream)
    httpx.get(f"{proxy.url}/api/v1/buyers")
    assert httpx.get(f"{proxy.url}/readyz").json()["reason"] == "token_rejected"


def test_not_ready_once_the_token_expired(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    past = datetime.now(UTC) - timedelta(minutes=1)
    proxy = start_proxy(recorder[1], token_expires_at=past)
    response = httpx.get(f"{proxy.url}/readyz")
    assert response.status_code == 503
    assert response.json()["reason"] == "token_expired"
    assert response.json()["token_expires_at"] == past.isoformat()


def test_readiness_does_not_call_invoisx_unless_probing_is_on(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    proxy = start_proxy(upstream)
    for _ in range(3):
        httpx.get(f"{proxy.url}/readyz")
        httpx.get(f"{proxy.url}/healthz")
    assert stand_in.requests == []


def test_probe_notices_a_revoked_token_at_most_once_per_interval(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = lambda request: _refusal(401, "UNAUTHORIZED")
    proxy = start_proxy(upstream, ready_probe_interval=60)
    first = httpx.get(f"{proxy.url}/readyz")
    second = httpx.get(f"{proxy.url}/readyz")
    assert (first.status_code, second.status_code) == (503, 503)
    assert first.json()["reason"] == "token_rejected"
    assert len(stand_in.requests) == 1
    probe: Recorded = stand_in.requests[0]
    assert (probe.method, probe.raw_path, probe.query_string) == (
        "GET",
        b"/api/v1/buyers",
        b"per_page=1",
    )
    assert probe.header("authorization") == [f"Bearer {TOKEN}"]
    assert probe.header("accept") == ["application/json"]


def test_probe_interval_below_a_minute_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^INVOISX_PROXY_READY_PROBE_INTERVAL: must be 0"):
        load_settings(env_file=None, api_token=TOKEN, ready_probe_interval=10)
