"""The per-call record: each way a call ends is recorded as the audit line must report it."""

from __future__ import annotations

import pytest

from proxy.errors import BODY_INCOMPLETE, SHUTTING_DOWN
from proxy.exchange import Exchange, new_request_id, request_id


def test_a_client_that_leaves_before_the_answer_is_499_and_not_invoisx_failing() -> None:
    exchange = Exchange("r1", client="app")
    exchange.client_gone()
    assert (exchange.status, exchange.decision, exchange.error_code) == (
        499,
        "upstream_error",
        "CLIENT_DISCONNECTED",
    )


def test_a_client_that_leaves_mid_answer_keeps_the_status_it_got() -> None:
    exchange = Exchange("r1", client="app")
    exchange.answered(201, b"59")
    exchange.client_gone()
    assert (exchange.status, exchange.error_code) == (201, "CLIENT_DISCONNECTED")
    assert exchange.ratelimit_remaining == b"59"


def test_an_abort_after_the_answer_started_keeps_its_status() -> None:
    exchange = Exchange("r1", client="app")
    exchange.answered(200, None)
    exchange.aborted(SHUTTING_DOWN)
    assert (exchange.status, exchange.decision, exchange.error_code) == (
        200,
        "aborted",
        "PROXY_SHUTTING_DOWN",
    )


def test_a_refusal_records_the_permission_it_needed_and_the_bytes_sent() -> None:
    exchange = Exchange("r1", client="app", required="read")
    exchange.refused(BODY_INCOMPLETE, 120)
    assert (exchange.status, exchange.error_code, exchange.bytes_out) == (
        400,
        "CLIENT_BODY_INCOMPLETE",
        120,
    )
    assert exchange.required == "read"  # the error named none: what the policy found stays


def test_a_replay_is_its_own_decision() -> None:
    exchange = Exchange("r1", client="app")
    exchange.replayed(201, 37)
    assert (exchange.status, exchange.decision, exchange.bytes_out) == (201, "replayed", 37)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [(b"trace-1.a:b_c", True), (b"has space", False), (b"x" * 129, False), (b"", False)],
)
def test_a_client_request_id_is_kept_only_when_safe_to_log(sent: bytes, kept: bool) -> None:
    chosen = request_id({"headers": [(b"x-request-id", sent)]})
    assert (chosen == sent.decode()) is kept
    if not kept:
        assert len(chosen) == 32 and int(chosen, 16) >= 0


def test_new_request_ids_do_not_repeat() -> None:
    assert len({new_request_id() for _ in range(1000)}) == 1000
