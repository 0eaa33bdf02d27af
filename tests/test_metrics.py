"""`/metrics`: names, labels and values after a mix of real calls through the proxy."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import httpx
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.credentials import fingerprint
from tests.conftest import TOKEN, Recorded, Recorder, Reply, RunningProxy

UNAUTHORIZED = b'{"success":false,"message":"Unauthenticated.","error_code":"UNAUTHORIZED"}'


def _samples(proxy: RunningProxy) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"{proxy.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _requests(method: str, route: str, status: int, decision: str) -> tuple[str, frozenset]:
    labels = {
        "method": method,
        "route": route,
        "status": str(status),
        "decision": decision,
        "client": "anonymous",
    }
    return ("invoisx_proxy_requests_total", frozenset(labels.items()))


def _invoisx(request: Recorded) -> Reply:
    if request.raw_path.endswith(b"/revoked"):
        return Reply(401, chunks=(UNAUTHORIZED,))
    headers = [(b"content-type", b"application/json"), (b"x-ratelimit-remaining", b"57")]
    return Reply(headers=headers)


def test_metrics_after_a_mix_of_calls(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _invoisx
    expiry = datetime(2027, 1, 31, tzinfo=UTC)
    proxy = start_proxy(upstream, token_permissions="read", token_expires_at=expiry)
    for buyer in ("byr_1f3a", "byr_99x", "byr_1f3a"):
        assert httpx.get(f"{proxy.url}/api/v1/buyers/{buyer}").status_code == 200
    assert httpx.get(f"{proxy.url}/api/v1/buyers?search=acme").status_code == 200
    assert httpx.delete(f"{proxy.url}/api/v1/buyers/byr_1f3a").status_code == 403
    assert httpx.get(f"{proxy.url}/api/v1/buyers/%2e%2e/x").status_code == 400
    assert httpx.request("PROPFIND", f"{proxy.url}/api/v1/buyers").status_code == 405
    assert httpx.get(f"{proxy.url}/api/v1/invoices/inv_7/revoked").status_code == 401
    proxy.audit_lines(at_least=8)

    samples = _samples(proxy)
    assert samples[_requests("GET", "/buyers/{id}", 200, "forwarded")] == 3
    assert samples[_requests("GET", "/buyers", 200, "forwarded")] == 1
    assert samples[_requests("DELETE", "/buyers/{id}", 403, "denied")] == 1
    assert samples[_requests("GET", "none", 400, "invalid")] == 1
    assert samples[_requests("OTHER", "/buyers", 405, "invalid")] == 1
    assert samples[_requests("GET", "/invoices/{id}/{name}", 401, "forwarded")] == 1
    assert samples[("invoisx_proxy_request_duration_seconds_count", frozenset())] == 8
    # Only the five forwarded calls waited for InvoisX.
    assert samples[("invoisx_proxy_upstream_duration_seconds_count", frozenset())] == 5
    assert samples[("invoisx_proxy_upstream_ratelimit_remaining", frozenset())] == 57
    assert samples[("invoisx_proxy_upstream_auth_failures_total", frozenset())] == 1
    info = ("invoisx_proxy_token_info", frozenset({("fingerprint", fingerprint(TOKEN))}))
    assert samples[info] == 1
    expiry_sample: tuple[str, frozenset[tuple[str, str]]] = (
        "invoisx_proxy_token_expiry_timestamp_seconds",
        frozenset(),
    )
    assert samples[expiry_sample] == expiry.timestamp()
    for result in ("success", "unchanged", "error"):
        reload_sample = ("invoisx_proxy_token_reloads_total", frozenset({("result", result)}))
        assert samples[reload_sample] == 0


def test_metrics_carry_no_secret_no_raw_id_and_no_query_value(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = start_proxy(recorder[1])
    httpx.get(f"{proxy.url}/api/v1/buyers/byr_4242?search=acme-secret")
    text = httpx.get(f"{proxy.url}/metrics").text
    assert "invoisx_proxy_requests_total" in text
    for leaked in (TOKEN, "byr_4242", "acme-secret"):
        assert leaked not in text


def test_no_expiry_gauge_without_an_expiry(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = start_proxy(recorder[1])
    assert (
        "invoisx_proxy_token_expiry_timestamp_seconds" not in httpx.get(f"{proxy.url}/metrics").text
    )
