"""Idempotency-Key: a repeat is answered from memory, never submitted to InvoisX twice."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config.keys import config_block
from proxy.errors import ProxyError
from proxy.stages.idempotency import MemoryStore, StoredResponse
from tests.conftest import Recorded, Recorder, Reply, RunningProxy, StartRedis, free_port
from tests.faulty import FaultServer, running_fault_server
from tests.wire import RawResponse, assert_proxy_error, parse_response

SUBMIT = "/api/v1/invoices/inv_1/submit"
SUBMITTED = b'{"success":true,"data":{"id":"inv_1","status":"submitted","uuid":"LHDN-42"}}'


def _submitted(request: Recorded) -> Reply:
    return Reply(201, chunks=(SUBMITTED,), delay=0.3)


def _post(proxy: RunningProxy, key: str, body: bytes = b"{}", **headers: str) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}{SUBMIT}", content=body, headers={"Idempotency-Key": key, **headers}
    )


def test_a_repeat_gets_the_stored_answer_without_calling_invoisx(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _submitted
    proxy = start_proxy(upstream)
    first = _post(proxy, "submit-inv_1-attempt")
    again = _post(proxy, "submit-inv_1-attempt")
    assert (first.status_code, first.content) == (201, SUBMITTED)
    assert (again.status_code, again.content) == (201, SUBMITTED)
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    assert len(stand_in.requests) == 1
    assert stand_in.requests[0].header("idempotency-key") == ["submit-inv_1-attempt"]
    assert proxy.audit_of(first)["decision"] == "forwarded"
    replay = proxy.audit_of(again)
    assert (replay["decision"], replay["status"], replay["upstream_ms"]) == ("replayed", 201, None)


def test_concurrent_duplicates_wait_for_the_first(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _submitted
    proxy = start_proxy(upstream)
    responses: list[httpx.Response] = []
    threads = [
        threading.Thread(target=lambda: responses.append(_post(proxy, "same-key")))
        for _ in range(5)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stand_in.requests) == 1
    assert [(r.status_code, r.content) for r in responses] == [(201, SUBMITTED)] * 5
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 4


def test_the_same_key_on_another_request_is_refused(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    proxy = start_proxy(upstream)
    assert _post(proxy, "k-1", b'{"lines":1}').status_code == 200
    other = _post(proxy, "k-1", b'{"lines":2}')
    assert other.status_code == 422
    assert other.json()["error_code"] == "IDEMPOTENCY_KEY_REUSED"
    elsewhere = httpx.put(
        f"{proxy.url}/api/v1/buyers/b1", content=b'{"lines":1}', headers={"Idempotency-Key": "k-1"}
    )
    assert elsewhere.status_code == 422
    assert len(stand_in.requests) == 1


def test_a_failed_call_is_not_kept_so_the_client_can_retry(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    failures = iter([503, 429])
    stand_in.reply = lambda request: Reply(next(failures, 201), chunks=(SUBMITTED,))
    proxy = start_proxy(upstream)
    assert _post(proxy, "retry-me").status_code == 503
    assert _post(proxy, "retry-me").status_code == 429
    assert _post(proxy, "retry-me").status_code == 201
    replayed = _post(proxy, "retry-me")
    assert (replayed.status_code, replayed.headers["idempotent-replayed"]) == (201, "true")
    assert len(stand_in.requests) == 3


def test_keys_belong_to_their_client(
    tmp_path: Path, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    config = tmp_path / "proxy.toml"
    config.write_text(
        config_block("billing", "ipk_billing_key_0123456789", ["update"])
        + config_block("backoffice", "ipk_backoffice_key_012345", ["update"])
    )
    proxy = start_proxy(upstream, config=config)
    for key in ("ipk_billing_key_0123456789", "ipk_backoffice_key_012345"):
        response = _post(proxy, "nightly-1", Authorization=f"Bearer {key}")
        assert "idempotent-replayed" not in response.headers
    assert len(stand_in.requests) == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\tkey"])
def test_malformed_keys_are_refused(
    key: str, recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = start_proxy(recorder[1])
    response = _post(proxy, key)
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["message"]
    assert recorder[0].requests == []


def test_safe_methods_ignore_the_key(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = start_proxy(recorder[1])
    for _ in range(2):
        httpx.get(f"{proxy.url}/api/v1/buyers", headers={"Idempotency-Key": "g"})
    assert len(recorder[0].requests) == 2


def _stored(size: int) -> StoredResponse:
    return StoredResponse(200, [], b"x" * size)


def test_memory_store_is_bounded_in_bytes_count_and_time() -> None:
    async def scenario() -> None:
        store = MemoryStore(ttl=60, max_entries=3, max_bytes=250)
        for key in ("a", "b", "c"):
            assert await store.claim(key, "f", "o") is None
            await store.finish(key, "o", _stored(100))  # "c" takes the bytes over 250: "a" goes
        assert await store.claim("a", "f", "o") is None  # forgotten: a new first call
        await store.finish("a", "o", "released")
        assert await store.claim("b", "f", "o") == _stored(100)
        assert await store.claim("d", "f", "o") is None  # b, c, d: full
        assert await store.claim("e", "f", "o") is None  # the oldest kept answer ("b") goes
        assert await store.claim("b", "f", "o") is None

        brief = MemoryStore(ttl=0.2, max_entries=10, max_bytes=1000)
        assert await brief.claim("k", "f", "o") is None
        await brief.finish("k", "o", _stored(10))
        await asyncio.sleep(0.25)
        assert await brief.claim("k", "f", "o") is None  # expired

        # Keys in flight are never evicted: with every slot in flight, a new key is refused.
        busy = MemoryStore(ttl=60, max_entries=2, max_bytes=1000)
        for key in ("x", "y"):
            assert await busy.claim(key, "f", "o") is None
        with pytest.raises(ProxyError) as caught:
            await busy.claim("z", "f", "o")
        assert (caught.value.status, caught.value.error_code) == (503, "IDEMPOTENCY_STORE_FULL")

        # Nor keys whose outcome is unknown: forgotten, they would let the call go out again.
        lost = MemoryStore(ttl=60, max_entries=2, max_bytes=1000)
        assert await lost.claim("u", "f", "o") is None
        await lost.finish("u", "o", "unknown")
        assert await lost.claim("v", "f", "o") is None
        await lost.finish("v", "o", _stored(10))
        assert await lost.claim("w", "f", "o") is None  # "v" went, not "u"
        with pytest.raises(ProxyError) as caught:
            await lost.claim("u", "f", "o")
        assert (caught.value.status, caught.value.error_code) == (
            409,
            "IDEMPOTENCY_OUTCOME_UNKNOWN",
        )

    asyncio.run(scenario())


async def _unknown_after_waiting(store: MemoryStore) -> None:
    assert await store.claim("k", "f", "o") is None
    waiter = asyncio.create_task(store.claim("k", "f", "other"))
    await asyncio.sleep(0.01)
    await store.finish("k", "other", "released")  # not its owner: no effect
    await asyncio.sleep(0.01)
    await store.finish("k", "o", "unknown")
    with pytest.raises(ProxyError) as caught:
        await waiter
    assert caught.value.error_code == "IDEMPOTENCY_OUTCOME_UNKNOWN"


def test_a_repeat_waiting_for_a_call_that_went_unanswered_gets_409() -> None:
    asyncio.run(_unknown_after_waiting(MemoryStore(ttl=60, max_entries=10, max_bytes=1000)))


@pytest.fixture
def fault() -> Iterator[FaultServer]:
    """A stand-in InvoisX that misbehaves on demand (`tests.faulty`); it outlives the proxy."""
    with running_fault_server() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def store_settings(request: pytest.FixtureRequest, start_redis: StartRedis) -> dict[str, Any]:
    """The proxy's settings for keys in its memory, or on a redis-server of the test's own."""
    return {} if request.param == "memory" else {"redis_url": start_redis().url}


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("slow", 504),  # sent, then no answer within the upstream timeout
        ("reset", 502),  # sent, then the connection was reset before any answer
        ("reset-mid-body", 502),  # the answer broke off halfway
    ],
)
def test_a_call_sent_and_never_answered_is_never_sent_again(
    kind: str,
    status: int,
    fault: FaultServer,
    store_settings: dict[str, Any],
    start_proxy: Callable[..., RunningProxy],
) -> None:
    proxy = start_proxy(
        f"http://127.0.0.1:{fault.port}/api/v1", upstream_timeout=0.3, **store_settings
    )
    url = f"{proxy.url}/api/v1/fault/{kind}"
    headers = {"Idempotency-Key": f"lost-{kind}"}
    first = httpx.post(url, content=b"{}", headers=headers, timeout=10)
    again = httpx.post(url, content=b"{}", headers=headers, timeout=10)
    assert fault.requests[kind] == 1
    assert first.status_code == status
    assert again.status_code == 409
    assert again.json()["error_code"] == "IDEMPOTENCY_OUTCOME_UNKNOWN"
    assert "Look the document up in InvoisX" in again.json()["message"]
    assert proxy.audit_of(first)["idempotency"] == "unknown"
    repeat = proxy.audit_of(again)
    assert (repeat["decision"], repeat["idempotency"]) == ("replayed", "unknown")


def test_a_call_that_never_left_releases_its_key(
    store_settings: dict[str, Any], start_proxy: Callable[..., RunningProxy]
) -> None:
    # Nothing listens there: the connection is refused before a byte of the request is sent.
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}/api/v1", **store_settings)
    responses = [_post(proxy, "never-sent") for _ in range(2)]
    for response in responses:  # the repeat went out again, and failed the same way
        assert (response.status_code, response.json()["error_code"]) == (
            502,
            "UPSTREAM_UNAVAILABLE",
        )
        assert proxy.audit_of(response)["idempotency"] == "released"


def test_a_call_with_a_key_goes_on_a_new_connection(
    fault: FaultServer, store_settings: dict[str, Any], start_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{fault.port}/api/v1", **store_settings)
    # Leaves a kept-alive connection that InvoisX hangs up on at its next request.
    assert httpx.get(f"{proxy.url}/api/v1/fault/close-next").status_code == 200
    response = httpx.post(
        f"{proxy.url}/api/v1/fault/ok", content=b"{}", headers={"Idempotency-Key": "new"}
    )
    assert fault.requests["ok"] == 1
    assert response.status_code == 200
    assert proxy.audit_of(response)["idempotency"] == "kept"


def test_answers_are_kept_and_replayed_in_either_store(
    store_settings: dict[str, Any],
    recorder: tuple[Recorder, str],
    start_proxy: Callable[..., RunningProxy],
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _submitted
    proxy = start_proxy(upstream, **store_settings)
    first, again = _post(proxy, "kept"), _post(proxy, "kept")
    assert (again.status_code, again.content) == (201, SUBMITTED)
    assert again.headers["idempotent-replayed"] == "true"
    assert [proxy.audit_of(r)["idempotency"] for r in (first, again)] == ["kept", "replayed"]
    assert _post(proxy, "kept", b'{"other":1}').status_code == 422
    assert len(stand_in.requests) == 1


def test_a_client_leaving_mid_body_is_logged_and_keeps_no_key(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = start_proxy(recorder[1])
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST {SUBMIT} HTTP/1.1\r\nHost: {host}\r\nIdempotency-Key: half\r\n"
            "Content-Length: 1000\r\n\r\n{".encode()
        )
    line = proxy.last_audit()
    assert (line["status"], line["error_code"]) == (400, "CLIENT_BODY_INCOMPLETE")
    assert "internal_error" not in proxy.log_path.read_text()
    assert recorder[0].requests == []
    assert _post(proxy, "half").status_code == 200  # the key was never claimed


def test_a_client_that_leaves_does_not_cut_its_idempotent_call_short(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = lambda request: Reply(201, chunks=(SUBMITTED,), delay=1.5)
    proxy = start_proxy(upstream)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{proxy.url}{SUBMIT}", content=b"{}", headers={"Idempotency-Key": "k"}, timeout=1.1
        )
    # InvoisX carried the call out; the retry gets its answer instead of a second submission.
    retry = _post(proxy, "k")
    assert (retry.status_code, retry.content) == (201, SUBMITTED)
    assert retry.headers["idempotent-replayed"] == "true"
    assert len(stand_in.requests) == 1
    assert stand_in.disconnects == 0


def test_a_token_level_refusal_is_not_kept(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    revoked = b'{"success":false,"message":"Unauthenticated.","error_code":"UNAUTHORIZED"}'
    answers = iter([Reply(401, chunks=(revoked,))])
    stand_in.reply = lambda request: next(answers, Reply(201, chunks=(SUBMITTED,)))
    proxy = start_proxy(upstream)
    assert _post(proxy, "after-rotation").status_code == 401
    again = _post(proxy, "after-rotation")  # e.g. after the operator rotated the token
    assert again.status_code == 201
    assert "idempotent-replayed" not in again.headers
    assert len(stand_in.requests) == 2


def test_size_limits_hold_for_idempotent_calls(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = start_proxy(recorder[1], max_body_bytes=1000, max_header_bytes=4096)
    too_long = _post(proxy, "big-body", b"x" * 1001)
    assert (too_long.status_code, too_long.json()["error_code"]) == (413, "PAYLOAD_TOO_LARGE")
    too_wide = _post(proxy, "big-head", b"{}", **{"X-Trace": "t" * 5000})
    assert (too_wide.status_code, too_wide.json()["error_code"]) == (431, "HEADERS_TOO_LARGE")
    assert recorder[0].requests == []


def _partial_upload(proxy: RunningProxy, key: str, declared: int, sent: bytes) -> socket.socket:
    """An Idempotency-Key POST that declares `declared` bytes and has sent only `sent`."""
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(
        f"POST {SUBMIT} HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n".encode()
        + sent
    )
    return conn


def _answer(conn: socket.socket) -> RawResponse:
    data = b""
    while b"\r\n\r\n" not in data or not parse_response(data).complete:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return parse_response(data)


def test_bodies_held_for_idempotent_calls_are_bounded_in_total(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    proxy = start_proxy(upstream, max_body_bytes=600_000, max_buffered_bytes=1_000_000)
    body = b'{"note":"' + b"x" * 499_988 + b'"}'  # 500,000 bytes
    first = _partial_upload(proxy, "big-1", len(body), body[:450_000])
    second = _partial_upload(proxy, "big-2", len(body), body[:450_000])
    with first, second:
        time.sleep(0.3)  # both now hold what they sent, 900,000 bytes of the budget
        refused = httpx.post(
            f"{proxy.url}{SUBMIT}", content=body, headers={"Idempotency-Key": "big-3"}
        )
        first.sendall(body[450_000:])
        second.sendall(body[450_000:])
        answers = [_answer(first), _answer(second)]
    assert refused.status_code == 503
    assert refused.json()["error_code"] == "PROXY_BUSY"
    assert refused.headers["retry-after"] == "1"
    assert [answer.status for answer in answers] == [200, 200]
    # The refused call read no body and kept no key: sent again, it goes out.
    again = httpx.post(f"{proxy.url}{SUBMIT}", content=body, headers={"Idempotency-Key": "big-3"})
    assert again.status_code == 200
    assert [len(request.body) for request in stand_in.requests] == [len(body)] * 3


def test_a_call_waiting_for_the_rate_limit_has_not_read_its_body(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    """The body is read only once the call may go: while it waits, the client's upload
    stops at what the socket buffers hold."""
    stand_in, upstream = recorder
    # InvoisX's 429 holds every call back for its Retry-After.
    stand_in.reply = lambda request: (
        Reply(429, headers=[(b"retry-after", b"2")]) if not stand_in.requests[:-1] else Reply()
    )
    proxy = start_proxy(upstream, rate_limit_per_minute=60, rate_limit_max_wait=5)
    assert _post(proxy, "spends-the-minute").status_code == 429
    body = b"[" + b"1," * 4_000_000 + b"1]"  # 8 MB
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        conn.connect((host, int(port)))
        conn.sendall(
            f"POST {SUBMIT} HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: waits\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        conn.setblocking(False)
        sent, until = 0, time.monotonic() + 1.0
        while time.monotonic() < until and sent < len(body):
            try:
                sent += conn.send(body[sent : sent + 65536])
            except BlockingIOError:
                time.sleep(0.005)
        conn.setblocking(True)
        conn.settimeout(10)
        assert sent < 2_000_000, sent
        conn.sendall(body[sent:])  # admitted once the Retry-After is over: read at last
        answer = _answer(conn)
    assert answer.status == 200, answer
    assert len(stand_in.requests) == 2 and len(stand_in.requests[1].body) == len(body)


def test_an_idempotent_upload_that_stalls_gets_408_and_keeps_no_key(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    proxy = start_proxy(upstream, client_timeout=0.5)
    with _partial_upload(proxy, "stalls", 100, b"{") as stalled:
        answer = _answer(stalled)
    body = assert_proxy_error(answer)
    assert body is not None and body["error_code"] == "CLIENT_TIMEOUT"
    assert stand_in.requests == []
    assert _post(proxy, "stalls", b"{}").status_code == 200


def test_an_idempotent_body_larger_than_the_whole_budget_is_413_not_503(
    recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, upstream = recorder
    proxy = start_proxy(upstream, max_buffered_bytes=1000)
    response = _post(proxy, "too-big-to-hold", b"[" + b"0," * 600 + b"0]")
    assert response.status_code == 413
    assert "INVOISX_PROXY_MAX_BUFFERED_BYTES" in response.json()["message"]
    assert stand_in.requests == []
    # Without a key the same body streams through: only held bodies count.
    assert httpx.post(f"{proxy.url}{SUBMIT}", content=b"[" + b"0," * 600 + b"0]").status_code == 200
