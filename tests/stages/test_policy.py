"""The policy stage: the permission a route needs, the token's and the client's permissions,
expiry and the method: refused locally, in the InvoisX envelope, InvoisX untouched."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from proxy.errors import ProxyError
from proxy.stages.policy import Permission, Policy, RuleSpec, parse_permissions
from tests.conftest import DOCUMENT_TYPES, TOKEN, Recorder, RunningProxy

Upstream = tuple[Recorder, str]
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("method", "path", "needed"),
    [
        ("GET", "buyers", Permission.READ),
        ("HEAD", "buyers/1", Permission.READ),
        ("POST", "buyers", Permission.CREATE),
        ("PUT", "buyers/1", Permission.UPDATE),
        ("PATCH", "buyers/1", Permission.UPDATE),
        ("DELETE", "buyers/1", Permission.DELETE),
        ("POST", "invoices/1/validate", Permission.UPDATE),
        ("POST", "invoices/1/submit", Permission.UPDATE),
        ("POST", "invoices/1/cancel", Permission.UPDATE),
        ("POST", "invoices/1/other", Permission.CREATE),
        ("GET", "invoices/1/submit", Permission.READ),
    ],
)
def test_default_required_permissions(method: str, path: str, needed: Permission) -> None:
    policy = Policy(granted=frozenset())
    assert policy.required_permission(method, tuple(path.split("/"))) == needed


# The document types besides invoices (above).
OTHER_DOCUMENT_TYPES = [kind for kind in DOCUMENT_TYPES if kind != "invoices"]


@pytest.mark.parametrize("kind", OTHER_DOCUMENT_TYPES)
@pytest.mark.parametrize("action", ["validate", "submit", "cancel"])
def test_document_actions_need_update_on_every_document_type(kind: str, action: str) -> None:
    policy = Policy(granted=frozenset())
    assert policy.required_permission("POST", (kind, "d1", action)) == Permission.UPDATE
    assert policy.required_permission("GET", (kind, "d1", action)) == Permission.READ
    assert policy.required_permission("POST", (kind,)) == Permission.CREATE
    assert policy.required_permission("POST", (kind, "d1", action, "x")) == Permission.CREATE


def test_operator_rules_override_defaults() -> None:
    rules = [
        RuleSpec(method="post", path="/invoices/*/submit", permission=Permission.CREATE),
        RuleSpec(method="GET", path="/reports/*", permission=Permission.UPDATE),
    ]
    policy = Policy(granted=frozenset(), rules=rules)
    assert policy.required_permission("POST", ("invoices", "9", "submit")) == Permission.CREATE
    assert policy.required_permission("POST", ("invoices", "9", "cancel")) == Permission.UPDATE
    assert policy.required_permission("GET", ("reports", "monthly")) == Permission.UPDATE
    assert policy.required_permission("GET", ("reports", "monthly", "x")) == Permission.READ


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"method": "FETCH", "path": "/x", "permission": "read"}, "unknown method"),
        ({"method": "GET", "path": "x", "permission": "read"}, "must start with '/'"),
        ({"method": "GET", "path": "/api/v1/x", "permission": "read"}, "relative to /api/v1"),
        ({"method": "GET", "path": "/x", "permission": "admin"}, "Input should be"),
    ],
)
def test_bad_rules_are_rejected(spec: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RuleSpec.model_validate(spec)


def test_parse_permissions() -> None:
    assert parse_permissions([" Read", "create ", ""]) == {Permission.READ, Permission.CREATE}
    with pytest.raises(ValueError, match="unknown permission 'admin'"):
        parse_permissions(["read", "admin"])
    with pytest.raises(ValueError, match="permissions are names"):
        parse_permissions(["read", 1])


@pytest.mark.parametrize(
    "pasted",
    [TOKEN, "ixt_live_short", "hunter2", "abcdefghijklm", "read,write", "s3cr3t"],
)
def test_unknown_permissions_that_may_be_secrets_are_not_echoed(pasted: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_permissions(["read", f" {pasted} "])
    assert str(caught.value).startswith("unknown permission (not shown")
    assert pasted not in str(caught.value)


@pytest.mark.parametrize("typo", ["craete", "Raed", "updat", "administrat"])
def test_unknown_permissions_that_look_like_typos_are_echoed(typo: str) -> None:
    with pytest.raises(ValueError, match=f"unknown permission '{typo}'; use create, read"):
        parse_permissions([typo])


def _authorize(
    policy: Policy,
    method: str,
    expires_at: datetime | None = None,
    now: datetime = NOW,
    client: frozenset[Permission] | None = None,
) -> Permission:
    scope = {"method": method, "query_string": b"", "headers": []}
    return policy.authorize(scope, ("buyers", "1"), client, expires_at, now).required


def test_authorize_names_the_missing_permission_and_setting() -> None:
    policy = Policy(granted=frozenset({Permission.READ}))
    assert _authorize(policy, "GET") == Permission.READ
    with pytest.raises(ProxyError) as caught:
        _authorize(policy, "DELETE")
    error = caught.value
    assert error.permission == "delete"
    assert (error.status, error.error_code, error.decision) == (403, "FORBIDDEN", "denied")
    assert "'delete'" in error.message and "INVOISX_TOKEN_PERMISSIONS" in error.message
    assert error.extra == {"required_permission": "delete", "missing_from": ["token"]}


def test_authorize_expiry_boundary() -> None:
    policy = Policy(granted=frozenset({Permission.READ}))
    _authorize(policy, "GET", NOW, NOW - timedelta(microseconds=1))
    with pytest.raises(ProxyError) as caught:
        _authorize(policy, "GET", NOW, NOW)
    assert (caught.value.status, caught.value.error_code) == (401, "TOKEN_EXPIRED")
    assert caught.value.permission == "read"


def test_authorize_checks_the_method_and_the_override_before_the_permission() -> None:
    policy = Policy(granted=frozenset())  # would refuse every permission
    with pytest.raises(ProxyError) as caught:
        _authorize(policy, "OPTIONS")
    assert (caught.value.status, caught.value.headers["allow"]) == (
        405,
        "GET, HEAD, POST, PUT, PATCH, DELETE",
    )
    scope = {"method": "GET", "query_string": b"_method=DELETE", "headers": []}
    with pytest.raises(ProxyError) as caught:
        policy.authorize(scope, ("buyers",), None, None, NOW)
    assert (caught.value.status, caught.value.permission) == (400, None)


def test_authorize_refuses_for_the_client_as_for_the_token() -> None:
    policy = Policy(granted=frozenset(Permission))
    with pytest.raises(ProxyError) as caught:
        _authorize(policy, "DELETE", client=frozenset({Permission.READ}))
    assert caught.value.extra["missing_from"] == ["client"]


@pytest.mark.parametrize(
    ("method", "path", "permission"),
    [
        ("DELETE", "/api/v1/buyers/1", "delete"),
        ("POST", "/api/v1/buyers", "create"),
        ("PUT", "/api/v1/buyers/1", "update"),
        ("POST", "/api/v1/invoices/1/submit", "update"),
        ("POST", "/api/v1/invoices/1/%73ubmit", "update"),
    ],
)
def test_refusal_over_http_never_reaches_upstream(
    recorder: Upstream,
    start_proxy: Callable[..., RunningProxy],
    method: str,
    path: str,
    permission: str,
) -> None:
    stand_in, upstream = recorder
    granted = {"create", "read", "update", "delete"} - {permission}
    proxy = start_proxy(upstream, token_permissions=",".join(sorted(granted)))
    response = httpx.request(method, proxy.url + path, content=b"{}")
    assert response.status_code == 403
    body = response.json()
    assert body["success"] is False
    assert body["error_code"] == "FORBIDDEN"
    assert body["required_permission"] == permission
    assert response.headers["x-request-id"]
    assert stand_in.requests == []
    line = proxy.last_audit()
    assert (line["decision"], line["required_permission"]) == ("denied", permission)


def test_read_only_token_still_reads(
    recorder: Upstream, start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    proxy = start_proxy(upstream, token_permissions="read")
    assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 200
    assert len(stand_in.requests) == 1


def test_expired_token_is_refused_locally(
    recorder: Upstream, start_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> None:
    stand_in, upstream = recorder
    # From a file, which a rotation can replace: it starts, and says the token has expired.
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\nexpires_at={past}\n")
    proxy = start_proxy(upstream, api_token=None, api_token_file=token_file)
    response = httpx.get(f"{proxy.url}/api/v1/buyers")
    assert response.status_code == 401
    assert response.json()["error_code"] == "TOKEN_EXPIRED"
    assert stand_in.requests == []
    assert proxy.last_audit()["decision"] == "expired"
    expired = [line for line in proxy.log_lines() if line["event"] == "token_expired"]
    assert [line["level"] for line in expired] == ["error"]
    assert not [line for line in proxy.log_lines() if line["event"] == "token_expiring"]


def test_expiry_soon_warns_at_startup(
    recorder: Upstream, start_proxy: Callable[..., RunningProxy]
) -> None:
    soon = (datetime.now(UTC) + timedelta(days=10)).date().isoformat()
    proxy = start_proxy(recorder[1], token_expires_at=soon)
    warnings = [line for line in proxy.log_lines() if line["event"] == "token_expiring"]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    later = (datetime.now(UTC) + timedelta(days=90)).date().isoformat()
    quiet = start_proxy(recorder[1], token_expires_at=later)
    assert not [line for line in quiet.log_lines() if line["event"] == "token_expiring"]


def test_rules_file_changes_required_permission(
    recorder: Upstream, start_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> None:
    stand_in, upstream = recorder
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[[rules]]\nmethod = "POST"\npath = "/invoices/*/submit"\npermission = "delete"\n'
    )
    proxy = start_proxy(upstream, token_permissions="create,read,update", config=config)
    response = httpx.post(f"{proxy.url}/api/v1/invoices/abc/submit")
    assert response.status_code == 403
    assert response.json()["required_permission"] == "delete"
    assert httpx.post(f"{proxy.url}/api/v1/invoices/abc/validate").status_code == 200
    assert [request.raw_path for request in stand_in.requests] == [b"/api/v1/invoices/abc/validate"]


def test_unknown_method_is_405(proxy: RunningProxy, recorder: Upstream) -> None:
    response = httpx.request("PROPFIND", f"{proxy.url}/api/v1/buyers")
    assert response.status_code == 405
    assert response.json()["error_code"] == "METHOD_NOT_ALLOWED"
    assert "DELETE" in response.headers["allow"]
    assert recorder[0].requests == []


def test_get_rules_hold_for_head() -> None:
    rules = [RuleSpec(method="GET", path="/reports/*", permission=Permission.UPDATE)]
    policy = Policy(granted=frozenset(), rules=rules)
    assert policy.required_permission("HEAD", ("reports", "x")) == Permission.UPDATE
