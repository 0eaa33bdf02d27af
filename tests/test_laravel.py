"""The method InvoisX runs is the method the policy checked, as a real Laravel backend reads it.

The far side is PHP's own request parsing (the built-in server's SAPI: `$_GET`, `$_POST`,
`$_SERVER`) with Illuminate's `Request` on top, method override on as Laravel's kernel has it
(`tests/stacks/laravel_router.php`). Each request either gets refused by the proxy, without
reaching PHP, or PHP runs it as the method the client sent.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningProxy, free_port
from tests.wire import assert_proxy_error, exchange, parse_response

ROUTER = Path(__file__).parent / "stacks" / "laravel_router.php"
ILLUMINATE = Path("/usr/share/php/Illuminate/Http/autoload.php")


class Laravel:
    """The PHP server and the requests it has read so far."""

    def __init__(self, url: str, seen: Path) -> None:
        self.url = url
        self._seen = seen

    def requests(self) -> list[dict[str, Any]]:
        if not self._seen.exists():
            return []
        return [json.loads(line) for line in self._seen.read_text().splitlines()]


@pytest.fixture(scope="module")
def laravel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Laravel]:
    """`php -S` serving the Laravel stand-in on a free loopback port."""
    php = shutil.which("php")
    assert php and ILLUMINATE.exists(), "needs php-cli and php-illuminate-http (.ci/run)"
    seen = tmp_path_factory.mktemp("laravel") / "seen.jsonl"
    port = free_port()
    process = subprocess.Popen(
        [php, "-S", f"127.0.0.1:{port}", str(ROUTER)],
        env={"LARAVEL_SEEN": str(seen), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "php -S did not start"
                time.sleep(0.05)
        yield Laravel(f"http://127.0.0.1:{port}/api/v1", seen)
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def create_only(laravel: Laravel, start_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    """A proxy whose token may only create: a DELETE or PUT run by Laravel would be a breach."""
    return start_proxy(laravel.url, token_permissions="create")


def _port(proxy: RunningProxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


def _post(proxy: RunningProxy, target: str, headers: dict[str, str], body: bytes) -> bytes:
    """A POST written byte for byte, so no client library tidies its names or types."""
    head = f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return exchange(_port(proxy), head.encode("latin-1") + body)


def _refused_or_run_as_post(laravel: Laravel, send: Callable[[], bytes]) -> dict[str, Any] | None:
    """Send; the refusal's body, or None when Laravel got the call and ran it as a POST."""
    before = len(laravel.requests())
    raw = send()
    response = parse_response(raw)
    refusal = assert_proxy_error(response)
    after = laravel.requests()
    if refusal is not None:
        assert len(after) == before, "a refused call reached InvoisX"
        return refusal
    assert response.status == 200, raw[:300]
    assert len(after) == before + 1
    assert after[-1]["method"] == "POST", after[-1]
    return None


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        (JSON, b'{"_method":"DELETE"}'),
        ({}, b'{"_method":"DELETE"}'),  # the proxy itself adds application/json
        ({"Content-Type": "application/vnd.api+json"}, b'{"name":"x","_method":"PUT"}'),
        (JSON, b'{"\\u005fmethod":"DELETE"}'),
        (JSON, b' {"a":{"b":"}"},"_method":"DELETE"}'),
    ],
)
def test_json_body_with_method_key_is_refused_before_laravel(
    create_only: RunningProxy, laravel: Laravel, headers: dict[str, str], body: bytes
) -> None:
    refusal = _refused_or_run_as_post(
        laravel, lambda: _post(create_only, "/api/v1/buyers", headers, body)
    )
    assert refusal is not None and refusal["error_code"] == "BAD_REQUEST"
    assert "_method" in refusal["message"]


@pytest.mark.parametrize(
    "query", ["_method=DELETE", "+_method=DELETE", "%20_method=DELETE", "_method%00x=PUT"]
)
def test_query_method_as_php_names_it_is_refused(
    create_only: RunningProxy, laravel: Laravel, query: str
) -> None:
    refusal = _refused_or_run_as_post(
        laravel, lambda: _post(create_only, f"/api/v1/buyers?{query}", JSON, b"{}")
    )
    assert refusal is not None and "_method" in refusal["message"]


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded,x",
        "application/x-www-form-urlencoded x",
        "Application/X-WWW-Form-Urlencoded",
        "multipart/form-data,boundary=B",
    ],
)
def test_form_types_as_php_cuts_them_are_refused(
    create_only: RunningProxy, laravel: Laravel, content_type: str
) -> None:
    body = b"_method=DELETE"
    if content_type.startswith("multipart"):
        body = b'--B\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--B--\r\n'
    headers = {"Content-Type": content_type}
    refusal = _refused_or_run_as_post(
        laravel, lambda: _post(create_only, "/api/v1/buyers", headers, body)
    )
    assert refusal is not None and refusal["error_code"] == "UNSUPPORTED_MEDIA_TYPE"


def test_underscored_headers_never_reach_php(create_only: RunningProxy, laravel: Laravel) -> None:
    headers = {
        "X_HTTP_METHOD_OVERRIDE": "DELETE",
        "X.HTTP.Method.Override": "DELETE",
        "X_HTTP_Method": "DELETE",
        "X_Proxy_Key": "client-secret-key",
        "X_Forwarded_For": "203.0.113.9",
        "X_Real_IP": "203.0.113.9",
        "Content_Type": "application/json",
        "Proxy": "http://203.0.113.9:3128",
        "Content-Type": "text/plain",
    }
    body = b'{"_method":"DELETE"}'
    sent = _refused_or_run_as_post(
        laravel, lambda: _post(create_only, "/api/v1/buyers", headers, body)
    )
    assert sent is None
    seen = laravel.requests()[-1]
    assert seen["is_json"] is False
    names = set(seen["headers"])
    assert not names & {
        "HTTP_X_HTTP_METHOD_OVERRIDE",
        "HTTP_X_HTTP_METHOD",
        "HTTP_X_PROXY_KEY",
        "HTTP_X_FORWARDED_FOR",
        "HTTP_X_REAL_IP",
        "HTTP_PROXY",
    }, names
    # The built-in server also lists the real Content-Type as HTTP_CONTENT_TYPE.
    assert seen["headers"]["HTTP_CONTENT_TYPE"] == "text/plain"
    assert seen["headers"]["HTTP_AUTHORIZATION"].startswith("Bearer ")


def test_a_second_content_type_is_refused(create_only: RunningProxy, laravel: Laravel) -> None:
    head = (
        b"POST /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: text/plain\r\nContent-Type: application/json\r\n"
        b'Content-Length: 20\r\n\r\n{"_method":"DELETE"}'
    )
    refusal = _refused_or_run_as_post(laravel, lambda: exchange(_port(create_only), head))
    assert refusal is not None and refusal["error_code"] == "BAD_REQUEST"


def test_chunked_json_split_inside_the_key_is_refused(
    create_only: RunningProxy, laravel: Laravel
) -> None:
    # Each chunk is its own write, so the proxy sees the key arrive in pieces.
    pieces = [b'{"name":"a\\"b", "_me', b"th", b'od":"DELETE"}']
    refusal = _refused_or_run_as_post(laravel, lambda: _chunked(_port(create_only), pieces))
    assert refusal is not None and "_method" in refusal["message"]


def test_a_trailer_cannot_change_the_checked_content_type(
    create_only: RunningProxy, laravel: Laravel
) -> None:
    """The head had no type (so the proxy sends JSON); a form type in a trailer, arriving
    after the checks, must not reach PHP and turn the body into `_method=DELETE`."""
    port = _port(create_only)
    refusal = _refused_or_run_as_post(
        laravel,
        lambda: _chunked(
            port,
            [b"_method=DELETE"],
            head=b"Idempotency-Key: trailer-1\r\n",
            trailer=b"Content-Type: application/x-www-form-urlencoded\r\n",
        ),
    )
    assert refusal is None
    assert laravel.requests()[-1]["input"] == []


def _chunked(
    port: int,
    pieces: list[bytes],
    *,
    head: bytes = b"Content-Type: application/json\r\n",
    trailer: bytes = b"",
) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(
            b"POST /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            + head
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for piece in pieces:
            conn.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
            time.sleep(0.05)
        conn.sendall(b"0\r\n" + trailer + b"\r\n")
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    return raw


@pytest.mark.parametrize(
    ("target", "headers", "body"),
    [
        ("/api/v1/buyers?_method_=DELETE", JSON, b"{}"),
        ("/api/v1/buyers?x[_method]=DELETE", JSON, b"{}"),
        ("/api/v1/buyers", JSON, b'{"a":{"_method":"DELETE"}}'),
        ("/api/v1/buyers", JSON, b'[{"_method":"DELETE"}]'),
        ("/api/v1/buyers", JSON, b'{"note":"\\"_method\\":\\"DELETE\\""}'),
        ("/api/v1/buyers", {"Content-Type": "text/plain"}, b'{"_method":"DELETE"}'),
    ],
)
def test_lookalikes_pass_and_laravel_runs_them_as_post(
    create_only: RunningProxy, laravel: Laravel, target: str, headers: dict[str, str], body: bytes
) -> None:
    sent = _refused_or_run_as_post(laravel, lambda: _post(create_only, target, headers, body))
    assert sent is None


def test_the_audit_line_names_the_refusal(create_only: RunningProxy, laravel: Laravel) -> None:
    response = httpx.post(
        f"{create_only.url}/api/v1/buyers", content=b'{"_method":"DELETE"}', headers=JSON
    )
    assert response.status_code == 400
    line = create_only.audit_of(response)
    assert (line["method"], line["decision"], line["error_code"]) == (
        "POST",
        "invalid",
        "BAD_REQUEST",
    )


def test_a_token_echoed_in_laravels_json_is_masked_as_php_escapes_it(
    laravel: Laravel, start_proxy: Callable[..., RunningProxy]
) -> None:
    """PHP's json_encode writes '/' as '\\/': a token holding one is echoed in that form."""
    token = "ixt/live/7Qw9xZ2mK4pL8sV1nB6cR3tY5uH0jD"
    proxy = start_proxy(laravel.url, api_token=token)
    response = httpx.post(f"{proxy.url}/api/v1/buyers", content=b"{}", headers=JSON)
    assert response.status_code == 200
    echoed = laravel.requests()[-1]["headers"]["HTTP_AUTHORIZATION"]
    assert echoed == f"Bearer {token}"  # what PHP got, and would have sent back escaped
    assert token.replace("/", "\\/").encode() not in response.content
    assert token.encode() not in response.content
    assert b"Bearer " + b"*" * len(token.replace("/", "\\/")) in response.content
