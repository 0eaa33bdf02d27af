"""`/healthz` and `/readyz`: liveness never touches InvoisX; readiness follows the token."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from proxy.config.credentials import fingerprint
from proxy.config.settings import ConfigError, load_settings
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
    assert ready.json() == {
        "status": "ready",
        "token_fingerprint": fingerprint(TOKEN),
        "token_expires_at": None,
    }

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
        "token_expires_at": None,
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


def _soon() -> datetime:
    """An expiry a moment from now: the proxy refuses to start with a token already expired."""
    return (datetime.now(UTC) + timedelta(seconds=1.5)).replace(microsecond=0)


def _wait_until(moment: datetime) -> None:
    time.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()) + 0.05)


def test_not_ready_once_the_token_expired(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    past = _soon()
    proxy = start_proxy(recorder[1], token_expires_at=past)
    _wait_until(past)
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


_LATER = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)


@pytest.mark.parametrize(
    ("expires_at", "rejected", "status", "state"),
    [
        (None, False, 200, {"status": "ready"}),
        (_LATER, False, 200, {"status": "ready"}),
        (None, True, 503, {"status": "unavailable", "reason": "token_rejected"}),
        (_LATER, True, 503, {"status": "unavailable", "reason": "token_rejected"}),
        ("soon", False, 503, {"status": "unavailable", "reason": "token_expired"}),
    ],
    ids=[
        "ready-no-expiry",
        "ready-expiring",
        "rejected-no-expiry",
        "rejected-expiring",
        "expired",
    ],
)
def test_readyz_has_the_same_keys_in_every_state(
    recorder: tuple[Recorder, str],
    start_proxy: Callable[..., RunningProxy],
    expires_at: datetime | str | None,
    rejected: bool,
    status: int,
    state: dict[str, str],
) -> None:
    stand_in, upstream = recorder
    expiry = _soon() if expires_at == "soon" else expires_at
    assert not isinstance(expiry, str)
    proxy = start_proxy(upstream, token_expires_at=expiry)
    if expiry is not None and expires_at == "soon":
        _wait_until(expiry)
    if rejected:
        stand_in.reply = lambda request: _refusal(401, "UNAUTHORIZED")
        assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 401
    response = httpx.get(f"{proxy.url}/readyz")
    assert response.status_code == status
    assert response.json() == {
        **state,
        "token_fingerprint": fingerprint(TOKEN),
        # Null when unknown, never missing: docs/operations.md, Health.
        "token_expires_at": None if expiry is None else expiry.isoformat(),
    }
