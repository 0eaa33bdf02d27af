"""The proxy in front of the sandbox InvoisX: real API behaviour passes through intact."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx

from proxy.sandbox import SandboxToken, new_token_value
from tests.conftest import RunningProxy, Sandbox

BUYER = {"name": "Kedai Runcit Ali", "tin": "IG21136626090"}


def _pair(
    start_sandbox_upstream: Callable[..., Sandbox],
    start_proxy: Callable[..., RunningProxy],
    **sandbox_options: object,
) -> tuple[Sandbox, RunningProxy]:
    sandbox = start_sandbox_upstream(**({"rate_limit_per_minute": 0} | sandbox_options))
    return sandbox, start_proxy(sandbox.url, api_token=sandbox.token.value)


def test_buyer_crud_through_the_proxy(
    start_sandbox_upstream: Callable[..., Sandbox], start_proxy: Callable[..., RunningProxy]
) -> None:
    _, proxy = _pair(start_sandbox_upstream, start_proxy)
    with httpx.Client(base_url=f"{proxy.url}/api/v1") as api:
        created = api.post("/buyers", json=BUYER)
        assert created.status_code == 201
        buyer = created.json()["data"]
        assert buyer["name"] == BUYER["name"]
        assert api.get(f"/buyers/{buyer['id']}").json()["data"]["tin"] == BUYER["tin"]
        updated = api.put(f"/buyers/{buyer['id']}", json=BUYER | {"name": "Kedai Ali"})
        assert updated.json()["data"]["name"] == "Kedai Ali"
        listing = api.get("/buyers", params={"search": "ali", "per_page": 5}).json()
        assert listing["meta"] == {"current_page": 1, "per_page": 5, "total": 1, "last_page": 1}
        deleted = api.delete(f"/buyers/{buyer['id']}")
        assert (deleted.status_code, deleted.content) == (204, b"")
        gone = api.get(f"/buyers/{buyer['id']}")
        assert gone.json()["error_code"] == "DOCUMENT_NOT_FOUND"


def test_a_client_without_accept_gets_json_not_a_redirect(
    start_sandbox_upstream: Callable[..., Sandbox], start_proxy: Callable[..., RunningProxy]
) -> None:
    sandbox, proxy = _pair(start_sandbox_upstream, start_proxy)
    bare = {"Accept": ""}
    assert httpx.post(f"{sandbox.url}/buyers", headers=bare).status_code == 302
    response = httpx.post(f"{proxy.url}/api/v1/buyers", json={}, headers=bare)
    assert response.status_code == 422
    assert response.json()["error_code"] == "VALIDATION_FAILED"
    assert set(response.json()["errors"]) == {"name", "tin"}


def test_document_state_errors_pass_through_and_are_audited(
    start_sandbox_upstream: Callable[..., Sandbox], start_proxy: Callable[..., RunningProxy]
) -> None:
    _, proxy = _pair(start_sandbox_upstream, start_proxy)
    with httpx.Client(base_url=f"{proxy.url}/api/v1") as api:
        buyer = api.post("/buyers", json=BUYER).json()["data"]["id"]
        line = {"description": "Kopi", "quantity": 10, "unitPrice": 2.5}
        invoice = api.post("/invoices", json={"buyerId": buyer, "invoiceLines": [line]})
        submit = api.post(f"/invoices/{invoice.json()['data']['id']}/submit")
    assert submit.status_code == 422
    assert submit.json()["error_code"] == "DOCUMENT_NOT_READY"
    audit = proxy.audit_of(submit)
    assert (audit["status"], audit["error_code"], audit["decision"]) == (
        422,
        "DOCUMENT_NOT_READY",
        "forwarded",
    )
    assert audit["required_permission"] == "update"


def test_rate_limit_headers_and_429_pass_through(
    start_sandbox_upstream: Callable[..., Sandbox], start_proxy: Callable[..., RunningProxy]
) -> None:
    sandbox = start_sandbox_upstream(rate_limit_per_minute=2)
    # No retries: a GET would otherwise wait out a short Retry-After and succeed.
    proxy = start_proxy(sandbox.url, api_token=sandbox.token.value, retry_max=0)
    first = httpx.get(f"{proxy.url}/api/v1/buyers")
    assert (first.headers["x-ratelimit-limit"], first.headers["x-ratelimit-remaining"]) == (
        "2",
        "1",
    )
    httpx.get(f"{proxy.url}/api/v1/buyers")
    limited = httpx.get(f"{proxy.url}/api/v1/buyers")
    assert limited.status_code == 429
    assert limited.json()["error_code"] == "RATE_LIMIT_EXCEEDED"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert int(limited.headers["x-ratelimit-reset"]) > datetime.now(UTC).timestamp()


def test_token_revoked_at_invoisx_answers_401_through_the_proxy(
    start_sandbox_upstream: Callable[..., Sandbox], start_proxy: Callable[..., RunningProxy]
) -> None:
    sandbox, proxy = _pair(start_sandbox_upstream, start_proxy)
    assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 200
    sandbox.app.state.tokens.revoke(sandbox.token.value)
    response = httpx.get(f"{proxy.url}/api/v1/buyers")
    assert response.status_code == 401
    assert response.json() == {
        "success": False,
        "message": "Unauthenticated.",
        "error_code": "UNAUTHORIZED",
    }
    assert proxy.audit_of(response)["error_code"] == "UNAUTHORIZED"


def test_token_expired_at_invoisx_before_the_declared_date(
    start_sandbox_upstream: Callable[..., Sandbox], start_proxy: Callable[..., RunningProxy]
) -> None:
    sandbox = start_sandbox_upstream(rate_limit_per_minute=0)
    past = datetime.now(UTC) - timedelta(seconds=1)
    expired = SandboxToken(new_token_value(), "old", frozenset({"read"}), expires_at=past)
    sandbox.app.state.tokens.add(expired)
    proxy = start_proxy(sandbox.url, api_token=expired.value, token_permissions="read")
    response = httpx.get(f"{proxy.url}/api/v1/buyers")
    assert response.status_code == 401
    assert response.json()["error_code"] == "TOKEN_EXPIRED"
    assert proxy.audit_of(response)["decision"] == "forwarded"
