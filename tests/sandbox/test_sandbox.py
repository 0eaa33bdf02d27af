"""The sandbox InvoisX API, exercised over real loopback HTTP (uvicorn + httpx, no mocks)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from proxy.sandbox import SandboxToken, create_sandbox_app, new_token_value
from tests.conftest import loopback_config, run_server

ALL = frozenset({"create", "read", "update", "delete"})
JSON = {"Accept": "application/json"}
BUYER = {"name": "Acme Trading Sdn Bhd", "tin": "C2584563200"}

StartSandbox = Callable[..., tuple[Starlette, str]]


@contextmanager
def _serve(app: Starlette) -> Iterator[str]:
    """Serve `app` on a free loopback port; yield its /api/v1 base URL."""
    with run_server(loopback_config(app)) as url:
        yield f"{url}/api/v1"


@pytest.fixture
def sandbox_tokens() -> dict[str, SandboxToken]:
    """Tokens by role: full access, read-only, create-only, expired, revoked."""
    past = datetime.now(UTC) - timedelta(minutes=1)
    return {
        "full": SandboxToken(new_token_value(), "full", ALL),
        "reader": SandboxToken(new_token_value(), "reader", frozenset({"read"})),
        "creator": SandboxToken(new_token_value(), "creator", frozenset({"create"})),
        "expired": SandboxToken(new_token_value(), "expired", ALL, expires_at=past),
        "revoked": SandboxToken(new_token_value(), "revoked", ALL, revoked=True),
    }


@pytest.fixture
def start_sandbox(
    sandbox_tokens: dict[str, SandboxToken],
) -> Iterator[StartSandbox]:
    """Start sandboxes with the fixture tokens; all are stopped at teardown."""
    with ExitStack() as stack:

        def start(rate_limit_per_minute: int = 0) -> tuple[Starlette, str]:
            app = create_sandbox_app(
                sandbox_tokens.values(), rate_limit_per_minute=rate_limit_per_minute
            )
            return app, stack.enter_context(_serve(app))

        yield start


@pytest.fixture
def sandbox_app_and_url(
    start_sandbox: StartSandbox,
) -> tuple[Starlette, str]:
    """A sandbox without rate limit."""
    return start_sandbox()


@pytest.fixture
def sandbox_url(sandbox_app_and_url: tuple[Starlette, str]) -> str:
    """The /api/v1 base URL of a sandbox without rate limit."""
    return sandbox_app_and_url[1]


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A plain client that never follows redirects."""
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.fixture
def api(
    sandbox_url: str, sandbox_tokens: dict[str, SandboxToken], http: httpx.Client
) -> Callable[..., httpx.Response]:
    """Call the sandbox as a well-behaved client: full token, Accept: application/json."""

    def call(
        method: str,
        path: str,
        *,
        token: str = "full",
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        auth = {**JSON, "Authorization": f"Bearer {sandbox_tokens[token].value}"}
        return http.request(
            method, sandbox_url + path, headers={**auth, **(headers or {})}, **kwargs
        )

    return call


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["success"] is False
    assert body["error_code"] == code
    return body


def _create_buyer(api: Callable[..., httpx.Response], **fields: Any) -> dict[str, Any]:
    response = api("POST", "/buyers", json={**BUYER, **fields})
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def _create_invoice(api: Callable[..., httpx.Response], **fields: Any) -> dict[str, Any]:
    body = {
        "buyerId": _create_buyer(api)["id"],
        "invoiceLines": [{"description": "Consulting", "quantity": 2, "unitPrice": 100}],
        **fields,
    }
    response = api("POST", "/invoices", json=body)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


# --- authentication and permissions -------------------------------------------------------


def test_missing_token_is_401_unauthorized(http: httpx.Client, sandbox_url: str) -> None:
    body = _error(http.get(sandbox_url + "/buyers", headers=JSON), 401, "UNAUTHORIZED")
    assert body["message"] == "Unauthenticated."


@pytest.mark.parametrize("authorization", ["Bearer ixs_not-a-real-token", "Basic abc", "Bearer"])
def test_unknown_or_malformed_token_is_401_unauthorized(
    http: httpx.Client, sandbox_url: str, authorization: str
) -> None:
    headers = {**JSON, "Authorization": authorization}
    body = _error(http.get(sandbox_url + "/buyers", headers=headers), 401, "UNAUTHORIZED")
    assert body["message"] == "Unauthenticated."


def test_expired_token_is_401_token_expired(api: Callable[..., httpx.Response]) -> None:
    _error(api("GET", "/buyers", token="expired"), 401, "TOKEN_EXPIRED")


def test_revoked_token_is_401_unauthorized(api: Callable[..., httpx.Response]) -> None:
    _error(api("GET", "/buyers", token="revoked"), 401, "UNAUTHORIZED")


def test_revocation_at_runtime_is_immediate(
    api: Callable[..., httpx.Response],
    sandbox_app_and_url: tuple[Starlette, str],
    sandbox_tokens: dict[str, SandboxToken],
) -> None:
    assert api("GET", "/buyers").status_code == 200
    sandbox_app_and_url[0].state.tokens.revoke(sandbox_tokens["full"].value)
    _error(api("GET", "/buyers"), 401, "UNAUTHORIZED")


def test_token_added_at_runtime_is_accepted(
    http: httpx.Client, sandbox_app_and_url: tuple[Starlette, str]
) -> None:
    app, url = sandbox_app_and_url
    token = app.state.tokens.add(SandboxToken(new_token_value(), "late", frozenset({"read"})))
    headers = {**JSON, "Authorization": f"Bearer {token.value}"}
    assert http.get(url + "/buyers", headers=headers).status_code == 200


@pytest.mark.parametrize(
    ("token", "method", "path", "permission"),
    [
        ("reader", "POST", "/buyers", "create"),
        ("reader", "PUT", "/buyers/{buyer}", "update"),
        ("reader", "PATCH", "/buyers/{buyer}", "update"),
        ("reader", "DELETE", "/buyers/{buyer}", "delete"),
        ("reader", "POST", "/invoices/{invoice}/validate", "update"),
        ("reader", "POST", "/invoices/{invoice}/submit", "update"),
        ("reader", "POST", "/invoices/{invoice}/cancel", "update"),
        ("creator", "GET", "/buyers", "read"),
        ("creator", "GET", "/invoices/{invoice}/status", "read"),
    ],
)
def test_missing_permission_is_403_forbidden_naming_it(
    api: Callable[..., httpx.Response], token: str, method: str, path: str, permission: str
) -> None:
    invoice = _create_invoice(api)
    target = path.format(buyer=invoice["buyerId"], invoice=invoice["id"])
    body = _error(api(method, target, token=token, json=BUYER), 403, "FORBIDDEN")
    assert f"'{permission}'" in body["message"]


def test_permitted_token_is_not_forbidden(api: Callable[..., httpx.Response]) -> None:
    invoice = _create_invoice(api)
    assert api("GET", f"/invoices/{invoice['id']}/status", token="reader").status_code == 200
    assert api("POST", "/buyers", token="creator", json=BUYER).status_code == 201


# --- Laravel-like answers without Accept: application/json --------------------------------


def test_without_accept_auth_failure_redirects_to_login(
    http: httpx.Client, sandbox_url: str, sandbox_tokens: dict[str, SandboxToken]
) -> None:
    for headers in ({}, {"Authorization": f"Bearer {sandbox_tokens['expired'].value}"}):
        response = http.get(sandbox_url + "/buyers", headers={"Accept": "*/*", **headers})
        assert response.status_code == 302
        assert response.headers["location"] == sandbox_url.removesuffix("/api/v1") + "/login"
        assert response.headers["content-type"].startswith("text/html")


def test_without_accept_validation_failure_redirects_back(
    http: httpx.Client, sandbox_url: str, sandbox_tokens: dict[str, SandboxToken]
) -> None:
    auth = {"Authorization": f"Bearer {sandbox_tokens['full'].value}"}
    referer = "http://client.example/buyers/new"
    back = http.post(sandbox_url + "/buyers", json={}, headers={**auth, "Referer": referer})
    assert back.status_code == 302
    assert back.headers["location"] == referer
    home = http.post(sandbox_url + "/buyers", json={}, headers=auth)
    assert home.status_code == 302
    assert home.headers["location"] == sandbox_url.removesuffix("/api/v1") + "/"


def test_without_accept_other_errors_are_html_pages(
    http: httpx.Client, sandbox_url: str, sandbox_tokens: dict[str, SandboxToken]
) -> None:
    headers = {"Authorization": f"Bearer {sandbox_tokens['reader'].value}"}
    missing = http.get(sandbox_url + "/buyers/nope", headers=headers)
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("text/html")
    assert "404 | Not Found" in missing.text
    denied = http.post(sandbox_url + "/buyers", json=BUYER, headers=headers)
    assert denied.status_code == 403
    assert denied.headers["content-type"].startswith("text/html")


# --- buyers --------------------------------------------------------------------------------


def test_buyer_crud(api: Callable[..., httpx.Response]) -> None:
    created = _create_buyer(
        api, id_type="BRN", id_value="201901000005", email="ap@acme.my", address={"city": "KL"}
    )
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", created["id"]
    )
    assert created["name"] == BUYER["name"]
    assert created["email"] == "ap@acme.my"
    assert created["address"] == {"city": "KL"}
    assert datetime.fromisoformat(created["created_at"]).tzinfo is not None
    path = f"/buyers/{created['id']}"

    fetched = api("GET", path)
    assert fetched.status_code == 200
    assert fetched.json() == {"success": True, "data": created}

    updated = api("PUT", path, json={"name": "Acme Renamed", "tin": "IG12345678901"})
    assert updated.status_code == 200
    data = updated.json()["data"]
    assert (data["id"], data["name"], data["tin"]) == (
        created["id"],
        "Acme Renamed",
        "IG12345678901",
    )
    assert data["email"] is None, "PUT is a full update: omitted fields are cleared"
    assert data["created_at"] == created["created_at"]
    assert api("GET", path).json()["data"] == data

    deleted = api("DELETE", path)
    assert deleted.status_code == 204
    assert deleted.content == b""
    _error(api("GET", path), 404, "DOCUMENT_NOT_FOUND")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize("buyer_id", ["not-a-uuid", "3f2b8c1e-0000-4000-8000-000000000000"])
def test_unknown_buyer_is_404_document_not_found(
    api: Callable[..., httpx.Response], method: str, buyer_id: str
) -> None:
    _error(api(method, f"/buyers/{buyer_id}", json=BUYER), 404, "DOCUMENT_NOT_FOUND")


def test_buyer_search_and_pagination(api: Callable[..., httpx.Response]) -> None:
    for index in range(5):
        _create_buyer(api, name=f"Kedai Runcit {index}", tin=f"IG0000000000{index}")
    _create_buyer(api, name="Syarikat Lain", tin="C9999999999")

    everything = api("GET", "/buyers").json()
    assert everything["meta"] == {"current_page": 1, "per_page": 15, "total": 6, "last_page": 1}
    assert len(everything["data"]) == 6

    page = api("GET", "/buyers", params={"search": "kedai RUNCIT", "per_page": 2, "page": 3})
    assert page.status_code == 200
    assert page.json()["meta"] == {"current_page": 3, "per_page": 2, "total": 5, "last_page": 3}
    assert [b["name"] for b in page.json()["data"]] == ["Kedai Runcit 4"]

    by_tin = api("GET", "/buyers", params={"search": "c99999"}).json()
    assert [b["name"] for b in by_tin["data"]] == ["Syarikat Lain"]

    none = api("GET", "/buyers", params={"search": "nobody"}).json()
    assert none["data"] == []
    assert none["meta"] == {"current_page": 1, "per_page": 15, "total": 0, "last_page": 1}


@pytest.mark.parametrize(
    ("params", "errors"),
    [
        ({"page": "abc"}, {"page": ["The page field must be an integer."]}),
        ({"page": "0"}, {"page": ["The page field must be at least 1."]}),
        ({"per_page": "101"}, {"per_page": ["The per page field must not be greater than 100."]}),
        ({"per_page": "1.5"}, {"per_page": ["The per page field must be an integer."]}),
    ],
)
def test_bad_paging_is_422(
    api: Callable[..., httpx.Response], params: dict[str, str], errors: dict[str, list[str]]
) -> None:
    for path in ("/buyers", "/invoices"):
        body = _error(api("GET", path, params=params), 422, "VALIDATION_FAILED")
        assert body["errors"] == errors


def test_buyer_validation_errors_map(api: Callable[..., httpx.Response]) -> None:
    response = api(
        "POST",
        "/buyers",
        json={
            "name": "   ",
            "tin": "123",
            "id_type": "SSM",
            "email": "not-an-email",
            "address": "Jalan 1",
            "contact": ["x"],
        },
    )
    body = _error(response, 422, "VALIDATION_FAILED")
    assert body["message"] == "The given data was invalid."
    assert body["errors"] == {
        "name": ["The name field is required."],
        "tin": ["The tin field format is invalid."],
        "id_type": ["The selected id type is invalid."],
        "email": ["The email field must be a valid email address."],
        "address": ["The address field must be an array."],
        "contact": ["The contact field must be an array."],
    }
    too_long = api("POST", "/buyers", json={"name": "x" * 256, "tin": 12345678901})
    assert _error(too_long, 422, "VALIDATION_FAILED")["errors"] == {
        "name": ["The name field must not be greater than 255 characters."],
        "tin": ["The tin field must be a string."],
    }


def test_buyer_update_is_validated_like_create(api: Callable[..., httpx.Response]) -> None:
    buyer = _create_buyer(api)
    body = _error(
        api("PUT", f"/buyers/{buyer['id']}", json={"name": "x"}), 422, "VALIDATION_FAILED"
    )
    assert body["errors"] == {"tin": ["The tin field is required."]}
    assert api("GET", f"/buyers/{buyer['id']}").json()["data"] == buyer


@pytest.mark.parametrize(
    ("tin", "valid"),
    [
        ("C2584563200", True),
        ("IG12345678901", True),
        ("EI00000000010", True),
        ("EI00000000040", True),
        ("D123456789", True),
        ("C12345678", False),
        ("C123456789012", False),
        ("X1234567890", False),
        ("c2584563200", False),
        ("EI00000000050", False),
    ],
)
def test_tin_shape(api: Callable[..., httpx.Response], tin: str, valid: bool) -> None:
    response = api("POST", "/buyers", json={"name": "Buyer", "tin": tin})
    assert response.status_code == (201 if valid else 422), response.text


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'"text"', "application/json"),
        (b'{"name": NaN}', "application/json"),
        (b'{"name": "Acme", "tin": "C2584563200"}', "text/plain"),
    ],
)
def test_body_that_is_not_a_json_object_is_422(
    api: Callable[..., httpx.Response], content: bytes, content_type: str
) -> None:
    response = api("POST", "/buyers", content=content, headers={"Content-Type": content_type})
    body = _error(response, 422, "VALIDATION_FAILED")
    assert list(body["errors"]) == ["body"]


# --- invoices ------------------------------------------------------------------------------


def test_invoice_create_computes_totals(api: Callable[..., httpx.Response]) -> None:
    buyer = _create_buyer(api)
    lines = [
        {"description": "Widget", "quantity": 3, "unitPrice": "10.005", "taxRate": 8},
        {"description": "Service", "quantity": 1.5, "unitPrice": 200},
    ]
    response = api("POST", "/invoices", json={"buyerId": buyer["id"], "invoiceLines": lines})
    assert response.status_code == 201
    invoice = response.json()["data"]
    assert invoice["status"] == "draft"
    assert invoice["invoiceNumber"] == "INV-000001"
    assert invoice["currency"] == "MYR"
    assert invoice["buyerId"] == buyer["id"]
    assert [line["subtotal"] for line in invoice["invoiceLines"]] == [30.02, 300]
    assert [line["taxAmount"] for line in invoice["invoiceLines"]] == [2.4, 0]
    assert (invoice["subtotal"], invoice["taxAmount"], invoice["totalAmount"]) == (
        330.02,
        2.4,
        332.42,
    )
    assert invoice["uuid"] is None
    assert "created_at" in invoice and "updated_at" in invoice

    second = _create_invoice(api, invoiceNumber="X-1", issueDate="2025-01-31", currency="USD")
    assert (second["invoiceNumber"], second["issueDate"], second["currency"]) == (
        "X-1",
        "2025-01-31",
        "USD",
    )
    assert _create_invoice(api)["invoiceNumber"] == "INV-000002"
    assert api("GET", f"/invoices/{invoice['id']}").json()["data"] == invoice


def test_invoice_validation_errors_map(api: Callable[..., httpx.Response]) -> None:
    response = api(
        "POST",
        "/invoices",
        json={
            "buyerId": "3f2b8c1e-0000-4000-8000-000000000000",
            "issueDate": "31/01/2025",
            "invoiceLines": [
                {"description": "ok", "quantity": 1, "unitPrice": -1},
                {"quantity": 0, "unitPrice": "abc", "taxRate": 101},
                "line",
            ],
        },
    )
    body = _error(response, 422, "VALIDATION_FAILED")
    assert body["errors"] == {
        "buyerId": ["The selected buyer id is invalid."],
        "issueDate": ["The issue date field must match the format Y-m-d."],
        "invoiceLines.0.unitPrice": ["The invoice lines.0.unit price field must be at least 0."],
        "invoiceLines.1.description": ["The invoice lines.1.description field is required."],
        "invoiceLines.1.quantity": ["The invoice lines.1.quantity field must be greater than 0."],
        "invoiceLines.1.unitPrice": ["The invoice lines.1.unit price field must be a number."],
        "invoiceLines.1.taxRate": [
            "The invoice lines.1.tax rate field must not be greater than 100."
        ],
        "invoiceLines.2": ["The invoice lines.2 field must be an array."],
    }
    empty = _error(api("POST", "/invoices", json={"invoiceLines": []}), 422, "VALIDATION_FAILED")
    assert empty["errors"] == {
        "buyerId": ["The buyer id field is required."],
        "invoiceLines": ["The invoice lines field is required."],
    }


def test_invoice_lifecycle(api: Callable[..., httpx.Response]) -> None:
    invoice = _create_invoice(api)
    path = f"/invoices/{invoice['id']}"

    updated = api(
        "PUT",
        path,
        json={
            "buyerId": invoice["buyerId"],
            "invoiceLines": [{"description": "Consulting", "quantity": 1, "unitPrice": 50}],
        },
    )
    assert updated.status_code == 200
    assert updated.json()["data"]["totalAmount"] == 50
    assert updated.json()["data"]["invoiceNumber"] == invoice["invoiceNumber"]

    ready = api("POST", f"{path}/validate")
    assert ready.status_code == 200
    assert ready.json()["data"]["status"] == "ready"

    valid = api("POST", f"{path}/submit").json()["data"]
    assert valid["status"] == "valid"
    assert re.fullmatch(r"[A-Z0-9]{26}", valid["uuid"])
    assert re.fullmatch(r"[A-Z0-9]{46}", valid["longId"])
    assert datetime.fromisoformat(valid["submittedAt"]).tzinfo is not None

    status = api("GET", f"{path}/status").json()["data"]
    assert status["status"] == "valid"
    assert status["uuid"] == valid["uuid"]

    cancelled = api("POST", f"{path}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["data"]["status"] == "cancelled"
    assert api("GET", f"{path}/status").json()["data"]["status"] == "cancelled"


def test_illegal_transitions(api: Callable[..., httpx.Response]) -> None:
    draft = f"/invoices/{_create_invoice(api)['id']}"
    _error(api("POST", f"{draft}/submit"), 422, "DOCUMENT_NOT_READY")
    _error(api("POST", f"{draft}/cancel"), 422, "DOCUMENT_NOT_VALID")

    api("POST", f"{draft}/validate")  # now ready
    body = {
        "buyerId": _create_buyer(api)["id"],
        "invoiceLines": [{"description": "d", "quantity": 1, "unitPrice": 1}],
    }
    _error(api("POST", f"{draft}/validate"), 403, "DOCUMENT_NOT_DRAFT")
    _error(api("PUT", f"{draft}", json=body), 403, "DOCUMENT_NOT_DRAFT")
    _error(api("DELETE", f"{draft}"), 403, "DOCUMENT_READ_ONLY")
    _error(api("POST", f"{draft}/cancel"), 422, "DOCUMENT_NOT_VALID")

    api("POST", f"{draft}/submit")  # now valid
    _error(api("POST", f"{draft}/submit"), 422, "DOCUMENT_NOT_READY")
    _error(api("POST", f"{draft}/validate"), 403, "DOCUMENT_NOT_DRAFT")
    _error(api("PUT", f"{draft}", json=body), 403, "DOCUMENT_NOT_DRAFT")
    _error(api("DELETE", f"{draft}"), 403, "DOCUMENT_READ_ONLY")

    api("POST", f"{draft}/cancel")  # now cancelled
    _error(api("POST", f"{draft}/cancel"), 422, "DOCUMENT_NOT_VALID")
    _error(api("DELETE", f"{draft}"), 403, "DOCUMENT_READ_ONLY")

    other = f"/invoices/{_create_invoice(api)['id']}"
    assert api("DELETE", other).status_code == 204
    _error(api("GET", other), 404, "DOCUMENT_NOT_FOUND")
    for action in ("validate", "submit", "cancel"):
        _error(api("POST", f"{other}/{action}"), 404, "DOCUMENT_NOT_FOUND")
    _error(api("GET", f"{other}/status"), 404, "DOCUMENT_NOT_FOUND")


def test_invoice_list_filters(api: Callable[..., httpx.Response]) -> None:
    first = _create_invoice(api, invoiceNumber="A-100")
    _create_invoice(api, invoiceNumber="B-200")
    api("POST", f"/invoices/{first['id']}/validate")
    other_buyer = _create_buyer(api, name="Kedai Emas")
    api(
        "POST",
        "/invoices",
        json={
            "buyerId": other_buyer["id"],
            "invoiceLines": [{"description": "Gold", "quantity": 1, "unitPrice": 1}],
        },
    )

    def numbers(**params: str) -> list[str]:
        response = api("GET", "/invoices", params=params)
        assert response.status_code == 200
        return [invoice["invoiceNumber"] for invoice in response.json()["data"]]

    assert numbers() == ["A-100", "B-200", "INV-000001"]
    assert numbers(status="ready") == ["A-100"]
    assert numbers(status="draft") == ["B-200", "INV-000001"]
    assert numbers(search="b-2") == ["B-200"]
    assert numbers(search="EMAS") == ["INV-000001"]
    assert numbers(status="valid") == []
    body = _error(api("GET", "/invoices", params={"status": "paid"}), 422, "VALIDATION_FAILED")
    assert body["errors"] == {"status": ["The selected status is invalid."]}


# --- routing -------------------------------------------------------------------------------


def test_unknown_path_is_404_not_found(api: Callable[..., httpx.Response]) -> None:
    for path in ("/sellers", "/buyers/x/y", "/buyers/"):
        _error(api("GET", path), 404, "NOT_FOUND")


def test_wrong_method_is_405_with_allow(api: Callable[..., httpx.Response]) -> None:
    body = _error(api("DELETE", "/buyers"), 405, "METHOD_NOT_ALLOWED")
    assert "DELETE" in body["message"]
    assert api("PUT", "/invoices").headers["allow"] == "GET, HEAD, POST"
    invoice = _create_invoice(api)
    _error(api("GET", f"/invoices/{invoice['id']}/submit"), 405, "METHOD_NOT_ALLOWED")


# --- rate limit ----------------------------------------------------------------------------


def _wait_for_fresh_window(margin: float = 2.0) -> None:
    """Sleep past the next minute boundary if it is near, so a test stays in one window."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


def test_rate_limit_headers_and_429(
    http: httpx.Client,
    start_sandbox: StartSandbox,
    sandbox_tokens: dict[str, SandboxToken],
) -> None:
    _, url = start_sandbox(rate_limit_per_minute=3)

    def get(token: str) -> httpx.Response:
        headers = {**JSON, "Authorization": f"Bearer {sandbox_tokens[token].value}"}
        return http.get(url + "/buyers", headers=headers)

    _wait_for_fresh_window()
    window_end = (int(time.time()) // 60 + 1) * 60
    responses = [get("full") for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining"] for r in responses] == ["2", "1", "0", "0"]
    for response in responses:
        assert response.headers["x-ratelimit-limit"] == "3"
        assert int(response.headers["x-ratelimit-reset"]) == window_end
    limited = responses[3]
    body = _error(limited, 429, "RATE_LIMIT_EXCEEDED")
    retry_after = int(limited.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert body["message"] == f"Too many requests. Please try again in {retry_after} seconds."

    # The limit is per token, every answer to a token carries the headers, and failed
    # authentication is not counted against anyone.
    assert get("reader").headers["x-ratelimit-remaining"] == "2"
    denied = http.post(
        url + "/buyers",
        json=BUYER,
        headers={**JSON, "Authorization": f"Bearer {sandbox_tokens['reader'].value}"},
    )
    assert denied.status_code == 403
    assert denied.headers["x-ratelimit-remaining"] == "1"
    unauthenticated = http.get(url + "/buyers", headers=JSON)
    assert unauthenticated.status_code == 401
    assert "x-ratelimit-limit" not in unauthenticated.headers


def test_rate_limit_zero_disables_limit_and_headers(
    api: Callable[..., httpx.Response],
) -> None:
    for _ in range(70):
        response = api("GET", "/buyers")
        assert response.status_code == 200
    assert "x-ratelimit-limit" not in response.headers


# --- public helpers -----------------------------------------------------------------------


def test_new_token_value_is_random_and_token_shaped() -> None:
    first, second = new_token_value(), new_token_value()
    assert first != second
    assert re.fullmatch(r"ixs_[A-Za-z0-9_-]{43}", first)


def test_sandbox_token_rejects_naive_expiry_and_unknown_permissions() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        SandboxToken("v", "n", ALL, expires_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="unknown permissions"):
        SandboxToken("v", "n", frozenset({"admin"}))
