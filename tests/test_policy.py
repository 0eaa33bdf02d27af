"""Permissions and expiry: refused locally, in the InvoisX envelope, InvoisX untouched."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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


def test_check_names_the_missing_permission_and_setting() -> None:
    policy = Policy(granted=frozenset({Permission.READ}))
    policy.check(Permission.READ, None, NOW)
    with pytest.raises(ProxyError) as caught:
        policy.check(Permission.DELETE, None, NOW)
    error = caught.value
    assert (error.status, error.error_code, error.decision) == (403, "FORBIDDEN", "denied")
    assert "'delete'" in error.message and "INVOISX_TOKEN_PERMISSIONS" in error.message
    assert error.extra == {"required_permission": "delete", "missing_from": ["token"]}


def test_check_expiry_boundary() -> None:
    policy = Policy(granted=frozenset({Permission.READ}))
    policy.check(Permission.READ, NOW, NOW - timedelta(microseconds=1))
    with pytest.raises(ProxyError) as caught:
        policy.check(Permission.READ, NOW, NOW)
    assert (caught.value.status, caught.value.error_code) == (401, "TOKEN_EXPIRED")


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


@pytest.mark.parametrize(
    ("query", "headers", "status"),
    [
        ("?_method=DELETE", {}, 400),
        ("?a=1&.method=DELETE", {}, 400),
        ("?%5Fmethod=DELETE", {}, 400),
        ("?_method[]=DELETE", {}, 400),
        ("", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ("", {"Content-Type": "multipart/form-data; boundary=x"}, 415),
    ],
)
def test_method_override_is_refused(
    proxy: RunningProxy, recorder: Upstream, query: str, headers: dict[str, str], status: int
) -> None:
    response = httpx.post(
        f"{proxy.url}/api/v1/buyers/1{query}", content=b"_method=DELETE", headers=headers
    )
    assert response.status_code == status
    assert response.json()["success"] is False
    assert recorder[0].requests == []


def test_queries_that_merely_mention_method_pass(proxy: RunningProxy, recorder: Upstream) -> None:
    response = httpx.get(f"{proxy.url}/api/v1/invoices", params={"payment_method": "card"})
    assert response.status_code == 200
    assert recorder[0].requests[-1].query_string == b"payment_method=card"


def _curl(*args: str) -> tuple[int, dict[str, Any]]:
    """Run the real curl binary; the status and JSON body it received."""
    result = subprocess.run(
        # No proxy from the environment: the test talks to the loopback proxy itself.
        [
            "curl",
            "--noproxy",
            "*",
            "--silent",
            "--show-error",
            "--write-out",
            "\n%{http_code}",
            *args,
        ],
        capture_output=True,
        check=True,
        text=True,
        timeout=30,
    )
    body, _, status = result.stdout.rpartition("\n")
    return int(status), json.loads(body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl command")
def test_curl_d_without_a_json_type_is_told_how_to_send_json(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    url = f"{proxy.url}/api/v1/buyers"
    payload = '{"name": "Acme Sdn Bhd"}'
    # curl -d sends application/x-www-form-urlencoded unless told otherwise.
    assert _curl("-d", payload, url) == (
        415,
        {
            "success": False,
            "message": "Form bodies are not forwarded: the InvoisX API takes JSON. Send the body "
            "with Content-Type: application/json (with curl: -H 'Content-Type: "
            "application/json', or --json instead of -d).",
            "error_code": "UNSUPPORTED_MEDIA_TYPE",
        },
    )
    assert recorder[0].requests == []
    # Both ways the hint names go through.
    assert _curl("-d", payload, "-H", "Content-Type: application/json", url)[0] == 200
    if "--json" in subprocess.run(["curl", "--help", "all"], capture_output=True, text=True).stdout:
        assert _curl("--json", payload, url)[0] == 200  # curl 7.82 and later
    assert {request.body for request in recorder[0].requests} == {payload.encode()}
    assert {request.header("content-type")[0] for request in recorder[0].requests} == {
        "application/json"
    }
