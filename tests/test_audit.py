"""The audit log: one JSON line per request with the agreed fields, and nothing secret."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx

from proxy.audit import AuditLog
from proxy.config.credentials import fingerprint
from tests.conftest import (
    TOKEN,
    ProxyProcess,
    Recorder,
    Reply,
    RunningProxy,
    free_port,
    subprocess_env,
)

Upstream = tuple[Recorder, str]

FIELDS = {
    "timestamp",
    "level",
    "event",
    "request_id",
    "client",
    "peer",
    "method",
    "path",
    "route",
    "query_keys",
    "status",
    "decision",
    "required_permission",
    "error_code",
    "duration_ms",
    "upstream_ms",
    "waited_ms",
    "retries",
    "upstream_429s",
    "idempotency",
    "bytes_in",
    "bytes_out",
    "token_fingerprint",
}


def test_forwarded_line_has_every_field(proxy: RunningProxy) -> None:
    response = httpx.get(
        f"{proxy.url}/api/v1/buyers",
        params={"search": "secret-buyer-name", "page": "3"},
        headers={"X-Request-ID": "erp-42.7"},
    )
    assert response.headers["x-request-id"] == "erp-42.7"
    line = proxy.last_audit()
    assert set(line) == FIELDS
    assert line["event"] == "request"
    assert line["request_id"] == "erp-42.7"
    assert (line["client"], line["peer"]) == ("anonymous", "127.0.0.1")
    assert (line["method"], line["path"], line["route"]) == ("GET", "/api/v1/buyers", "/buyers")
    assert line["query_keys"] == ["page", "search"]
    assert (line["status"], line["decision"], line["error_code"]) == (200, "forwarded", None)
    assert line["required_permission"] == "read"
    assert line["token_fingerprint"] == fingerprint(TOKEN)
    assert line["bytes_out"] == len(response.content)
    assert 0 <= line["upstream_ms"] <= line["duration_ms"]
    stamp = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    offset = stamp.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    assert "secret-buyer-name" not in proxy.log_path.read_text()


def test_unsafe_request_id_is_replaced(proxy: RunningProxy) -> None:
    response = httpx.get(f"{proxy.url}/api/v1/buyers", headers={"X-Request-ID": 'a b"}'})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert proxy.last_audit()["request_id"] == response.headers["x-request-id"]


def test_invoisx_error_code_is_recorded(proxy: RunningProxy, recorder: Upstream) -> None:
    stand_in, _ = recorder
    stand_in.reply = lambda request: Reply(
        status=422,
        chunks=[b'{"success":false,"message":"m","error_code":"DOCUMENT_NOT_READY"}'],
    )
    httpx.post(f"{proxy.url}/api/v1/invoices/1/submit")
    line = proxy.last_audit()
    assert (line["status"], line["error_code"], line["decision"]) == (
        422,
        "DOCUMENT_NOT_READY",
        "forwarded",
    )


def test_odd_error_codes_are_not_copied_into_the_log(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    stand_in, _ = recorder
    stand_in.reply = lambda request: Reply(status=500, chunks=[b'{"error_code":"a b\\nc"}'])
    httpx.get(f"{proxy.url}/api/v1/buyers")
    assert proxy.last_audit()["error_code"] is None


def test_nothing_secret_in_any_response_or_log_line(
    recorder: Upstream, start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    proxy = start_proxy(upstream, token_permissions="read")
    client_secret = "client-sent-credential-value"
    body_secret = "body-content-never-logged"
    responses = [
        httpx.get(
            f"{proxy.url}/api/v1/buyers?tin=C12345678901",
            headers={"Authorization": f"Bearer {client_secret}"},
        ),
        httpx.post(f"{proxy.url}/api/v1/buyers", content=body_secret),
        httpx.delete(f"{proxy.url}/api/v1/buyers/1"),
        httpx.get(f"{proxy.url}/api/v1/../etc"),
        httpx.get(f"{proxy.url}/elsewhere"),
        httpx.request("TRACE", f"{proxy.url}/api/v1/buyers"),
        httpx.get(f"{proxy.url}/healthz"),
    ]
    stand_in.reply = lambda request: Reply(
        status=401,
        chunks=[b'{"success":false,"message":"Unauthenticated.","error_code":"UNAUTHORIZED"}'],
    )
    responses.append(httpx.get(f"{proxy.url}/api/v1/invoices"))
    for response in responses:
        assert TOKEN not in response.text
        assert all(TOKEN not in value for value in response.headers.values())
    # /healthz is not an API call, so it has no audit line.
    assert len(proxy.audit_lines(at_least=len(responses) - 1)) == len(responses) - 1
    log = proxy.log_path.read_text()
    for secret in (TOKEN, client_secret, body_secret, "C12345678901"):
        assert secret not in log


def test_startup_and_shutdown_are_logged_as_json(
    recorder: Upstream, spawn_proxy: Callable[..., ProxyProcess]
) -> None:
    proxy = spawn_proxy(
        INVOISX_API_TOKEN=TOKEN, INVOISX_API_URL=recorder[1], INVOISX_TOKEN_PERMISSIONS="read"
    )
    startup = proxy.wait_for("startup")
    assert startup["token_fingerprint"] == fingerprint(TOKEN)
    assert startup["upstream"] == recorder[1]
    assert proxy.stop() == 0
    own = [line for line in proxy.lines() if "logger" not in line]  # uvicorn's lines aside
    assert [line["event"] for line in own] == ["startup", "shutdown"]
    assert own[1]["token_fingerprint"] == fingerprint(TOKEN)


def test_uvicorns_lines_have_the_audit_lines_shape(
    recorder: Upstream, spawn_proxy: Callable[..., ProxyProcess]
) -> None:
    proxy = spawn_proxy(INVOISX_API_TOKEN=TOKEN, INVOISX_API_URL=recorder[1])
    assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 200
    proxy.wait_for("request")
    assert proxy.stop() == 0
    lines = proxy.output_path.read_text().splitlines()
    for line in lines:
        assert line.startswith('{"timestamp":'), line
        assert list(json.loads(line))[:3] == ["timestamp", "level", "event"], line
    uvicorn_lines = [json.loads(line) for line in lines if '"logger":"uvicorn.error"' in line]
    assert "Application startup complete." in [line["event"] for line in uvicorn_lines]
    assert {"request", "startup", "shutdown"} <= {json.loads(line)["event"] for line in lines}


def test_every_level_writes_a_line_debug_included(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path, to_stdout=False)
    for level in ("debug", "info", "warning", "error", "critical"):
        getattr(audit.logger, level)("probe", at=level)
    audit.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["level"] for line in lines] == ["debug", "info", "warning", "error", "critical"]


def test_a_closed_stdout_does_not_cost_the_log_file_its_lines(
    tmp_path: Path, recorder: Upstream
) -> None:
    log = tmp_path / "audit.log"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--port", str(port)],
        env=subprocess_env(
            INVOISX_API_TOKEN=TOKEN, INVOISX_API_URL=recorder[1], INVOISX_PROXY_LOG_FILE=str(log)
        ),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()  # started; then nobody reads stdout any more
        process.stdout.close()
        deadline = time.monotonic() + 15
        while not log.exists() or '"event":"startup"' not in log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for _ in range(3):
            _wait_for_answer(f"http://127.0.0.1:{port}/api/v1/buyers")
        deadline = time.monotonic() + 5
        while log.read_text().count('"event":"request"') < 3:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_for_answer(url: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            assert httpx.get(url).status_code == 200
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
