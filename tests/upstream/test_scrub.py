"""The token never comes back: an answer that echoes it loses the header or has it masked."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import socket
from collections.abc import Callable

import httpx
from hypothesis import given
from hypothesis import strategies as st

from proxy.upstream.scrub import Scrub
from tests.conftest import TOKEN, Recorder, Reply, RunningProxy, raw_server
from tests.wire import exchange, parse_response

Upstream = tuple[Recorder, str]

SECRET = TOKEN.encode()
MASK = b"*" * len(SECRET)
# What a Laravel debug page (or a WAF's error page) shows of the request it was sent.
PAGE_HEAD = b"<h1>Whoops</h1><table><tr><td>authorization</td><td>Bearer "
PAGE_TAIL = b"</td></tr></table>"


def _get(proxy: RunningProxy, path: str, *extra: bytes) -> bytes:
    port = int(proxy.url.rsplit(":", 1)[1])
    head = [b"GET " + path.encode() + b" HTTP/1.1", b"Host: 127.0.0.1", b"Accept: text/html"]
    return exchange(port, b"\r\n".join([*head, *extra, b"Connection: close", b"", b""]))


def _scrubbed_total(proxy: RunningProxy) -> dict[str, float]:
    text = httpx.get(f"{proxy.url}/metrics").text
    assert TOKEN not in text
    prefix = "invoisx_proxy_token_scrubbed_total{where="
    return {
        line.removeprefix(prefix).split("}")[0].strip('"'): float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def test_the_secret_is_masked_wherever_chunks_split_it() -> None:
    body = PAGE_HEAD + SECRET + b" and again " + SECRET + PAGE_TAIL
    expected = PAGE_HEAD + MASK + b" and again " + MASK + PAGE_TAIL
    for first in range(len(body) + 1):
        for second in (first, first + 7, first + len(SECRET) // 2):
            scrub = Scrub(b"Bearer " + SECRET)
            pieces = [body[:first], body[first:second], body[second:]]
            out = [scrub.body(piece, last=False) for piece in pieces[:-1]]
            out.append(scrub.body(pieces[-1], last=True))
            assert b"".join(data for data, _ in out) == expected, (first, second)
            assert sum(found for _, found in out) == 2


@given(
    secret=st.binary(min_size=1, max_size=6).map(lambda raw: bytes(b"ab"[c % 2] for c in raw)),
    body=st.lists(st.sampled_from([b"a", b"b", b"*", b"x"]), max_size=40).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6).map(sorted),
)
def test_streamed_masking_is_the_same_as_masking_the_whole_body(
    secret: bytes, body: bytes, cuts: list[int]
) -> None:
    # Few distinct bytes, so the secret overlaps itself and its starts are everywhere.
    scrub = Scrub(b"Bearer " + secret)
    bounds = [0, *cuts, len(body)]
    pieces = [body[start:end] for start, end in itertools.pairwise(bounds)]
    out = [scrub.body(piece, last=False)[0] for piece in pieces]
    out.append(scrub.body(b"", last=True)[0])
    assert b"".join(out) == body.replace(secret, b"*" * len(secret))


def test_only_a_possible_start_of_the_secret_waits_for_the_next_chunk() -> None:
    scrub = Scrub(b"Bearer " + SECRET)
    assert scrub.body(b"plain text, no secret", last=False) == (b"plain text, no secret", 0)
    # `i` starts the secret, but `ixx` cannot: nothing is held.
    assert scrub.body(b"an ixx", last=False) == (b"an ixx", 0)
    assert scrub.body(b"so far " + SECRET[:5], last=False) == (b"so far ", 0)
    # The held bytes turn out not to be the secret: they go out with the next chunk.
    assert scrub.body(b"!", last=False) == (SECRET[:5] + b"!", 0)
    assert scrub.body(b"end " + SECRET[:9], last=True) == (b"end " + SECRET[:9], 0)


def test_headers_holding_the_secret_are_dropped_by_value_or_name() -> None:
    scrub = Scrub(b"Bearer " + SECRET)
    kept, dropped = scrub.headers(
        [
            (b"content-type", b"text/html"),
            (b"x-debug-auth", b"Bearer " + SECRET),
            (b"x-echo", b"token=" + SECRET + b";"),
            (b"x-" + SECRET, b"1"),
        ]
    )
    assert kept == [(b"content-type", b"text/html")]
    assert dropped == ["x-debug-auth", "x-echo", "x-" + "*" * len(SECRET)]


def test_response_headers_holding_the_token_never_reach_the_client(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    stand_in, _ = recorder
    stand_in.reply = lambda request: Reply(
        status=401,
        headers=[
            (b"content-type", b"application/json"),
            (b"www-authenticate", b'Bearer error="invalid_token", token="' + SECRET + b'"'),
            (b"x-debug-authorization", b"Bearer " + SECRET),
            (b"x-echo", SECRET),
            (b"x-kept", b"1"),
        ],
    )
    raw = _get(proxy, "/api/v1/buyers", b"X-Request-ID: header-echo")
    assert SECRET not in raw
    response = parse_response(raw)
    assert response.status == 401
    assert response.header("x-kept") == ["1"]
    for name in ("www-authenticate", "x-debug-authorization", "x-echo"):
        assert response.header(name) == []
    scrubs = proxy.wait_for_events("token_scrubbed", 3)
    assert sorted((line["where"], line["header"]) for line in scrubs) == [
        ("header", "www-authenticate"),
        ("header", "x-debug-authorization"),
        ("header", "x-echo"),
    ]
    assert {line["request_id"] for line in scrubs} == {"header-echo"}
    assert {line["level"] for line in scrubs} == {"warning"}


def test_the_token_in_a_content_length_body_is_masked_to_the_same_length(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    stand_in, _ = recorder
    page = PAGE_HEAD + SECRET + PAGE_TAIL + b"<pre>HTTP_AUTHORIZATION=Bearer " + SECRET + b"</pre>"
    middle = len(PAGE_HEAD) + len(SECRET) // 2
    stand_in.reply = lambda request: Reply(
        status=500,
        headers=[(b"content-type", b"text/html"), (b"content-length", b"%d" % len(page))],
        chunks=[page[:middle], page[middle:]],
    )
    raw = _get(proxy, "/api/v1/buyers", b"X-Request-ID: body-echo")
    assert SECRET not in raw
    response = parse_response(raw)
    assert response.status == 500
    assert response.header("content-length") == [str(len(page))]
    assert response.complete
    assert response.body == page.replace(SECRET, MASK)
    line = proxy.audit_lines(at_least=1)[-1]
    assert (line["status"], line["decision"], line["bytes_out"]) == (500, "forwarded", len(page))
    scrubs = proxy.wait_for_events("token_scrubbed", 1)
    assert sum(line["occurrences"] for line in scrubs) == 2
    assert {(line["request_id"], line["where"]) for line in scrubs} == {("body-echo", "body")}


def test_a_token_split_across_two_chunks_is_masked_at_every_split_point(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    # The second chunk goes out only once the client has the first one's bytes before the
    # token: the proxy sees the exact boundary, and holds back nothing it need not.
    release: queue.Queue[None] = queue.Queue()

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                split = int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1])
                writer.write(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/html\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + chunk(PAGE_HEAD + SECRET[:split])
                )
                await writer.drain()
                await asyncio.to_thread(release.get, timeout=5)
                writer.write(chunk(SECRET[split:] + PAGE_TAIL) + b"0\r\n\r\n")
                await writer.drain()

    with raw_server(handle) as upstream_port:
        proxy = start_proxy(f"http://127.0.0.1:{upstream_port}/api/v1")
        port = int(proxy.url.rsplit(":", 1)[1])
        for split in range(len(SECRET) + 1):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.sendall(
                    b"GET /api/v1/debug/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Connection: close\r\n\r\n" % split
                )
                raw = bytearray()
                while PAGE_HEAD not in raw:
                    received = client.recv(65536)
                    assert received, f"closed before the first chunk (split {split})"
                    raw += received
                release.put(None)
                while received := client.recv(65536):
                    raw += received
            assert SECRET not in raw, split
            response = parse_response(bytes(raw))
            assert (response.status, response.complete) == (500, True), split
            assert response.body == PAGE_HEAD + MASK + PAGE_TAIL, split
    scrubs = proxy.wait_for_events("token_scrubbed", len(SECRET) + 1)
    assert {line["where"] for line in scrubs} == {"body"}


def test_an_echoed_token_reaches_neither_the_log_nor_the_metrics(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    stand_in, _ = recorder
    before = _scrubbed_total(proxy)
    # An error code shaped like an InvoisX one would otherwise go into the audit line.
    echo = b'{"success":false,"message":"Bearer ' + SECRET + b'","error_code":"' + SECRET + b'"}'
    stand_in.reply = lambda request: Reply(
        status=401,
        headers=[(b"content-type", b"application/json"), (b"x-echo", SECRET)],
        chunks=[echo],
    )
    raw = _get(proxy, "/api/v1/buyers", b"X-Request-ID: echo")
    assert SECRET not in raw
    assert parse_response(raw).body == echo.replace(SECRET, MASK)
    line = proxy.last_audit()
    assert (line["status"], line["error_code"]) == (401, None)
    proxy.wait_for_events("token_scrubbed", 2)
    assert TOKEN not in proxy.log_path.read_text()
    after = _scrubbed_total(proxy)
    assert after["header"] - before.get("header", 0) == 1
    assert after["body"] - before.get("body", 0) == 2


def test_an_idempotent_replay_returns_the_masked_answer(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    stand_in, _ = recorder
    stand_in.reply = lambda request: Reply(
        status=201,
        headers=[(b"content-type", b"text/html"), (b"x-echo", SECRET)],
        chunks=[PAGE_HEAD + SECRET[:10], SECRET[10:] + PAGE_TAIL],
    )
    port = int(proxy.url.rsplit(":", 1)[1])
    request = (
        b"POST /api/v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: echo-1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    first, again = exchange(port, request), exchange(port, request)
    assert len(stand_in.requests) == 1
    for raw in (first, again):
        assert SECRET not in raw
        response = parse_response(raw)
        assert response.status == 201
        assert response.header("x-echo") == []
        assert response.body == PAGE_HEAD + MASK + PAGE_TAIL
    assert parse_response(again).header("idempotent-replayed") == ["true"]


def test_the_secret_is_masked_as_php_escapes_it_in_json_and_html() -> None:
    secret = b"ab/c<d&e"
    escaped = [b"ab\\/c<d&e", b"ab/c&lt;d&amp;e"]
    for form in escaped:
        body = b'{"echo":"Bearer ' + form + b'"}'
        for split in range(1, len(body)):
            scrub = Scrub(b"Bearer " + secret)
            first, early = scrub.body(body[:split], last=False)
            second, late = scrub.body(body[split:], last=True)
            out = first + second
            assert early + late == 1 and len(out) == len(body), (form, split)
            assert out == body.replace(form, b"*" * len(form))
    kept, dropped = Scrub(b"Bearer " + secret).headers([(b"x-echo", escaped[0]), (b"a", b"b")])
    assert (kept, dropped) == ([(b"a", b"b")], ["x-echo"])
