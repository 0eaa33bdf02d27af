"""Token rotation without restart: the token file is watched, swapped atomically, logged."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from proxy.audit import AuditLog
from proxy.config.credentials import TokenHolder, UpstreamToken, fingerprint
from proxy.config.rotation import warn_before_expiry
from tests.conftest import ProxyProcess, Recorded, Recorder, Reply, RunningProxy

OLD = "ixt_live_old_A1b2C3d4E5f6G7h8"
NEW = "ixt_live_new_Z9y8X7w6V5u4T3s2"
ROOT = Path(__file__).resolve().parents[2]
# Three polls at 0.05 s: a watch that applied a half-written file would have by now; the
# proxy waits for a file to read the same for 0.5 s (`proxy.watch.SETTLE_SECONDS`).
HALF_WRITTEN_FOR = 0.15


def _write(path: Path, text: str) -> None:
    # How secret managers replace a file: write aside, then rename over it in one step.
    aside = path.with_suffix(".tmp")
    aside.write_text(text)
    os.replace(aside, path)


def _start(
    start_proxy: Callable[..., RunningProxy], upstream: str, path: Path, **overrides: object
) -> RunningProxy:
    return start_proxy(upstream, api_token=None, api_token_file=path, **overrides)


def _wait_for(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_rotation_under_load_drops_nothing_and_lands_within_3_seconds(
    tmp_path: Path, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    seen: list[tuple[float, str]] = []

    def reply(request: Recorded) -> Reply:
        seen.append((time.monotonic(), request.header("authorization")[0]))
        return Reply()

    stand_in.reply = reply
    path = tmp_path / "token"
    path.write_text(OLD)
    proxy = _start(start_proxy, upstream, path)  # the default 2 s polling interval
    failures: list[str] = []
    stop = threading.Event()

    def caller() -> None:
        with httpx.Client(base_url=proxy.url) as client:
            while not stop.is_set():
                try:
                    status = client.get("/api/v1/buyers").status_code
                except httpx.HTTPError as error:
                    failures.append(repr(error))
                else:
                    if status != 200:
                        failures.append(str(status))

    callers = [threading.Thread(target=caller) for _ in range(4)]
    for thread in callers:
        thread.start()
    try:
        time.sleep(0.5)
        written = time.monotonic()
        _write(path, NEW)
        _wait_for(lambda: any(auth == f"Bearer {NEW}" for _, auth in seen), timeout=5)
        time.sleep(1)
    finally:
        stop.set()
        for thread in callers:
            thread.join()

    assert failures == []
    first_new = min(when for when, auth in seen if auth == f"Bearer {NEW}")
    assert first_new - written < 3.0
    # Only calls that took the old token before the swap may still carry it.
    assert all(auth == f"Bearer {NEW}" for when, auth in seen if when > first_new + 0.5)
    assert {auth for _, auth in seen} == {f"Bearer {OLD}", f"Bearer {NEW}"}
    reloaded = proxy.events("token_reloaded")
    assert len(reloaded) == 1
    assert (reloaded[0]["old_fingerprint"], reloaded[0]["new_fingerprint"]) == (
        fingerprint(OLD),
        fingerprint(NEW),
    )
    fingerprints = [line["token_fingerprint"] for line in proxy.audit_lines()]
    assert fingerprints[-1] == fingerprint(NEW) and fingerprints[0] == fingerprint(OLD)
    logs_and_metrics = proxy.log_path.read_text() + httpx.get(f"{proxy.url}/metrics").text
    assert OLD not in logs_and_metrics and NEW not in logs_and_metrics
    assert 'invoisx_proxy_token_reloads_total{result="success"} 1.0' in logs_and_metrics


def test_bad_file_keeps_the_last_good_token(
    tmp_path: Path, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    path = tmp_path / "token"
    path.write_text(OLD)
    proxy = _start(start_proxy, upstream, path, reload_interval=0.05)

    _write(path, "\n")
    assert len(proxy.wait_for_events("token_reload_failed", 1)) == 1
    path.unlink()
    assert len(proxy.wait_for_events("token_reload_failed", 2)) == 2
    _write(path, "two words")
    assert len(proxy.wait_for_events("token_reload_failed", 3)) == 3
    assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 200
    assert stand_in.requests[-1].header("authorization") == [f"Bearer {OLD}"]
    reasons = [line["reason"] for line in proxy.events("token_reload_failed")]
    assert reasons[0] == "INVOISX_API_TOKEN_FILE: the token is empty"
    assert reasons[1].startswith("INVOISX_API_TOKEN_FILE: cannot read")
    assert "contains spaces" in reasons[2]
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert 'invoisx_proxy_token_reloads_total{result="error"} 3.0' in metrics

    _write(path, NEW)
    assert len(proxy.wait_for_events("token_reloaded", 1)) == 1
    assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 200
    assert stand_in.requests[-1].header("authorization") == [f"Bearer {NEW}"]


def test_a_token_file_rewritten_in_place_is_used_only_once_complete(
    tmp_path: Path, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    path = tmp_path / "token"
    path.write_text(OLD)
    proxy = _start(start_proxy, upstream, path, reload_interval=0.05)
    with path.open("w") as file:
        file.write(NEW[:12])  # a plausible token on its own
        file.flush()
        time.sleep(HALF_WRITTEN_FOR)
        assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 200
        assert stand_in.requests[-1].header("authorization") == [f"Bearer {OLD}"]
        file.write(NEW[12:])
    reloaded = proxy.wait_for_events("token_reloaded", 1)
    assert reloaded[0]["new_fingerprint"] == fingerprint(NEW)
    assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 200
    assert stand_in.requests[-1].header("authorization") == [f"Bearer {NEW}"]
    time.sleep(1)  # twice the settling: time for a second reload
    assert len(proxy.events("token_reloaded")) == 1
    assert proxy.events("token_reload_failed") == []


def test_a_new_token_clears_the_rejection_and_brings_its_expiry(
    tmp_path: Path, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    revoked = b'{"success":false,"message":"Unauthenticated.","error_code":"UNAUTHORIZED"}'
    stand_in.reply = lambda request: (
        Reply(401, chunks=(revoked,))
        if request.header("authorization") == [f"Bearer {OLD}"]
        else Reply()
    )
    path = tmp_path / "token"
    path.write_text(OLD)
    proxy = _start(start_proxy, upstream, path, reload_interval=0.05)
    assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 401
    assert httpx.get(f"{proxy.url}/readyz").json()["reason"] == "token_rejected"

    _write(path, f"{NEW}\nexpires_at=2027-11-30\n")
    _wait_for(lambda: httpx.get(f"{proxy.url}/readyz").status_code == 200)
    ready = httpx.get(f"{proxy.url}/readyz").json()
    assert ready["token_fingerprint"] == fingerprint(NEW)
    assert ready["token_expires_at"] == "2027-12-01T00:00:00+08:00"
    assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 200
    metrics = httpx.get(f"{proxy.url}/metrics").text
    expiry = datetime(2027, 11, 30, 16, tzinfo=UTC).timestamp()  # end of the day in Malaysia
    assert f"invoisx_proxy_token_expiry_timestamp_seconds {expiry:.7e}" in metrics
    assert f'invoisx_proxy_token_info{{fingerprint="{fingerprint(NEW)}"}} 1.0' in metrics
    assert fingerprint(OLD) not in metrics


def test_sighup_reloads_at_once(
    tmp_path: Path, recorder: tuple[Recorder, str], spawn_proxy: Callable[..., ProxyProcess]
) -> None:
    stand_in, upstream = recorder
    path = tmp_path / "token"
    path.write_text(OLD)
    proxy = spawn_proxy(
        INVOISX_API_TOKEN_FILE=str(path),
        INVOISX_API_URL=upstream,
        INVOISX_PROXY_RELOAD_INTERVAL="3600",  # polling alone would not notice for an hour
        PYTHONPATH=str(ROOT),  # this tree's code, not a copy installed in the venv
    )
    _write(path, NEW)
    proxy.process.send_signal(signal.SIGHUP)
    reloaded = proxy.wait_for("token_reloaded", timeout=3)
    assert reloaded["new_fingerprint"] == fingerprint(NEW)
    assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 200
    assert stand_in.requests[-1].header("authorization") == [f"Bearer {NEW}"]
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for("token_unchanged", timeout=3)
    assert proxy.stop() == 0


@pytest.mark.parametrize(("days_left", "warnings"), [(10, 3), (40, 0)])
def test_expiry_warning_repeats_while_the_token_nears_expiry(
    tmp_path: Path, days_left: int, warnings: int
) -> None:
    token = UpstreamToken(OLD, datetime.now(UTC) + timedelta(days=days_left, hours=1))
    log_path = tmp_path / "audit.log"
    audit = AuditLog(log_path, to_stdout=False)

    async def three_days() -> None:
        # Three "days" of 50 ms each.
        task = asyncio.create_task(
            warn_before_expiry(TokenHolder(token), 30, audit.logger, every=0.05)
        )
        await asyncio.sleep(0.12)
        task.cancel()

    asyncio.run(three_days())
    audit.close()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["token_expiring"] * warnings
    if warnings:
        assert lines[0]["days_left"] == days_left
        assert lines[0]["token_fingerprint"] == fingerprint(OLD)


def test_a_token_that_expires_while_running_is_logged_at_that_moment(tmp_path: Path) -> None:
    token = UpstreamToken(OLD, datetime.now(UTC) + timedelta(seconds=0.2))
    log_path = tmp_path / "audit.log"
    audit = AuditLog(log_path, to_stdout=False)

    async def a_moment_past_expiry() -> None:
        # A day between checks: only waking at the expiry itself can log it within 2 s.
        task = asyncio.create_task(warn_before_expiry(TokenHolder(token), 30, audit.logger))
        await asyncio.sleep(2)
        task.cancel()

    asyncio.run(a_moment_past_expiry())
    audit.close()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(line["event"], line["level"]) for line in lines] == [
        ("token_expiring", "warning"),
        ("token_expired", "error"),
    ]
    assert lines[0]["days_left"] == 0
