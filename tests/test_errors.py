"""Every answer the proxy makes itself: one code each, the README's table, the envelope."""

from __future__ import annotations

import asyncio
import inspect
import json
from datetime import UTC, datetime

from starlette.types import Message

from proxy import errors
from proxy.errors import ErrorCode, ProxyError
from tests.wire import PROXY_ERRORS

# Codes no client is ever answered with: the client had left (its audit line has 499).
_AUDIT_ONLY = {ErrorCode.CLIENT_DISCONNECTED}

# One call of every refusal constructor, with arguments of the shape the stages pass.
_BUILT = {
    "not_http": errors.not_http(),
    "idempotency_store_unavailable": errors.idempotency_store_unavailable(),
    "idempotency_outcome_unknown": errors.idempotency_outcome_unknown(),
    "target_too_long": errors.target_too_long(8192),
    "framing_too_large": errors.framing_too_large(65536),
    "head_too_slow": errors.head_too_slow(10),
    "headers_too_large": errors.headers_too_large(32768),
    "path_not_allowed": errors.path_not_allowed("it contains a dot segment"),
    "not_served": errors.not_served("Only paths below /api/v1/ are served by this proxy"),
    "foreign_host": errors.foreign_host(),
    "cross_site": errors.cross_site(),
    "unauthorized": errors.unauthorized("The client key is not known to this proxy."),
    "method_not_allowed": errors.method_not_allowed("TRACE", "GET"),
    "override_refused": errors.override_refused("query parameter"),
    "two_content_types": errors.two_content_types(),
    "form_body": errors.form_body(),
    "token_expired": errors.token_expired(datetime(2026, 1, 1, tzinfo=UTC), "read"),
    "forbidden": errors.forbidden("delete", ["token", "client"]),
    "content_length_invalid": errors.content_length_invalid(),
    "body_too_large": errors.body_too_large(1000),
    "body_length_mismatch": errors.body_length_mismatch(3, 5),
    "body_stalled": errors.body_stalled(10, 3, 5),
    "target_not_allowed": errors.target_not_allowed(),
    "header_not_utf8": errors.header_not_utf8(),
    "rate_limited": errors.rate_limited("the queue of waiting calls is full", 60, 2, 1800000002),
    "idempotency_key_invalid": errors.idempotency_key_invalid(),
    "idempotency_key_reused": errors.idempotency_key_reused(),
    "held_body_too_large": errors.held_body_too_large(1000),
    "bodies_busy": errors.bodies_busy(),
    "idempotency_store_full": errors.idempotency_store_full(),
    "response_not_kept": errors.response_not_kept(),
    "upstream_unavailable": errors.upstream_unavailable("InvoisX could not be reached."),
    "upstream_timeout": errors.upstream_timeout("InvoisX did not answer within 1 s."),
}


def test_every_refusal_has_a_constructor_here_and_each_is_called_above() -> None:
    constructors = {
        name
        for name, function in inspect.getmembers(errors, inspect.isfunction)
        if function.__module__ == errors.__name__
        and inspect.signature(function).return_annotation == "ProxyError"
        and not name.startswith("_")
    }
    assert constructors == set(_BUILT)


def test_the_readme_table_lists_exactly_the_codes_clients_can_get() -> None:
    assert set(PROXY_ERRORS) == {str(code) for code in ErrorCode} - _AUDIT_ONLY


def test_the_readme_table_is_sorted_by_status_then_code() -> None:
    # PROXY_ERRORS keeps the table's row order.
    rows = [(status, code) for code, status in PROXY_ERRORS.items()]
    assert rows == sorted(rows)


def test_each_answer_has_the_status_the_readme_gives_its_code() -> None:
    built = [*_BUILT.values(), errors.INTERNAL_ERROR, errors.SHUTTING_DOWN, errors.BODY_INCOMPLETE]
    for error in built:
        assert isinstance(error.error_code, ErrorCode)
        assert PROXY_ERRORS[error.error_code] == error.status, error.error_code
    answered = {error.error_code for error in built}
    assert answered == set(ErrorCode) - _AUDIT_ONLY  # no code without a refusal


def test_the_policy_refusals_name_the_permission_they_needed() -> None:
    assert _BUILT["forbidden"].permission == "delete"
    assert _BUILT["token_expired"].permission == "read"
    assert _BUILT["not_served"].permission is None


def test_a_permission_refusal_says_where_to_grant_it() -> None:
    error = _BUILT["forbidden"]
    assert (error.status, error.decision) == (403, "denied")
    assert error.message.startswith("This request needs the 'delete' permission, which ")
    token_side, client_side = error.message.split(" and ")
    assert "INVOISX_TOKEN_PERMISSIONS" in token_side and "INVOISX_PROXY_CONFIG" in client_side
    assert error.extra == {"required_permission": "delete", "missing_from": ["token", "client"]}


def test_a_rate_limit_refusal_carries_invoisx_headers() -> None:
    error = _BUILT["rate_limited"]
    assert (error.status, error.decision) == (429, "rate_limited")
    assert "(the queue of waiting calls is full; InvoisX allows 60 a minute)" in error.message
    assert error.message.endswith("Please try again in 2 seconds.")
    assert error.headers == {
        "retry-after": "2",
        "x-ratelimit-limit": "60",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "1800000002",
    }


def test_an_error_goes_out_as_the_invoisx_envelope() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    error: ProxyError = _BUILT["bodies_busy"]
    size = asyncio.run(errors.send_error(send, error, "req-1"))
    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 503
    assert headers[b"x-request-id"] == b"req-1" and headers[b"retry-after"] == b"1"
    assert int(headers[b"content-length"]) == len(body["body"]) == size
    assert json.loads(body["body"]) == {
        "success": False,
        "message": error.message,
        "error_code": "PROXY_BUSY",
    }
