"""The pipeline's stage order, in process: each request fails two stages and must be refused
by the earlier one, with the audit line naming that stage's outcome.

No sockets: the endpoint is called as the ASGI app it is, and no case gets as far as the
forwarder, whose upstream (port 9) has nothing listening.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message

from proxy.app import create_app
from proxy.config.keys import config_block
from proxy.config.settings import load_settings
from tests.conftest import TOKEN

READER_KEY = "ixp_reader_5cQ0rM2vT8wLk3N"
WRITER_KEY = "ixp_writer_9dX4pB7nQ1sZe6H"
_LOOPBACK = [(b"host", b"127.0.0.1:8080")]
_READER = [(b"authorization", f"Bearer {READER_KEY}".encode())]
_WRITER = [(b"authorization", f"Bearer {WRITER_KEY}".encode())]
_BAD_KEY = [(b"idempotency-key", b"has spaces")]


def _scope(method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    path, _, query = target.partition(b"?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path.decode(),
        "raw_path": path,
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }


def _call(
    tmp_path: Path, method: str, target: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Run one call through a fresh proxy's endpoint; its status, envelope and audit line."""
    config = tmp_path / "proxy.toml"
    config.write_text(
        config_block("reader", READER_KEY, ["read"])
        + config_block("writer", WRITER_KEY, ["read", "create"])
    )
    log = tmp_path / "audit.log"
    settings = load_settings(
        env_file=None,
        api_token=TOKEN,
        api_url="http://127.0.0.1:9/api/v1",
        token_permissions="create,read,update,delete",
        config=config,
        log_file=log,
        max_body_bytes=1000,
        max_header_bytes=2000,
    )
    app = create_app(settings, audit_to_stdout=False)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async def run() -> None:
        # Start-up and shutdown as uvicorn runs them: the audit file is written and closed.
        async with app.app.router.lifespan_context(app.app):
            await app.endpoint(_scope(method, target, headers), receive, send)

    asyncio.run(run())
    start, body = sent
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    (audit,) = [line for line in lines if line["event"] == "request"]
    return start["status"], json.loads(body["body"]), audit


# The 400s differ only in what they say.
_SAYS = {
    "caller before client key": "Host header",
    "override before permission": "_method",
    "target characters before idempotency": "target is not allowed",
    "idempotency before forward": "Idempotency-Key",
}
_HUGE = [(b"x-pad", b"p" * 3000)]
_TOO_LONG_BODY = [(b"content-length", b"5000")]


@pytest.mark.parametrize(
    ("stages", "method", "target", "headers", "status", "code", "required"),
    [
        ("target before client key", "GET", b"/api/v2/buyers", [], 404, "NOT_FOUND", None),
        ("caller before client key", "GET", b"/api/v1/buyers", [(b"host", b"evil.example")], 400,
         "BAD_REQUEST", None),
        ("client key before policy", "DELETE", b"/api/v1/buyers/1", _LOOPBACK, 401,
         "UNAUTHORIZED", None),
        ("method before limits", "OPTIONS", b"/api/v1/buyers", _LOOPBACK + _READER + _HUGE, 405,
         "METHOD_NOT_ALLOWED", None),
        ("override before permission", "POST", b"/api/v1/buyers?_method=GET",
         _LOOPBACK + _READER, 400, "BAD_REQUEST", None),
        ("permission before limits", "POST", b"/api/v1/buyers",
         _LOOPBACK + _READER + _TOO_LONG_BODY, 403, "FORBIDDEN", "create"),
        ("headers before idempotency", "GET", b"/api/v1/buyers", _LOOPBACK + _READER + _HUGE,
         431, "HEADERS_TOO_LARGE", "read"),
        ("body size before idempotency", "POST", b"/api/v1/buyers",
         _LOOPBACK + _WRITER + _TOO_LONG_BODY + _BAD_KEY, 413, "PAYLOAD_TOO_LARGE", "create"),
        ("target characters before idempotency", "POST", b"/api/v1/buyers?a=\x01",
         _LOOPBACK + _WRITER + _BAD_KEY, 400, "BAD_REQUEST", "create"),
        ("idempotency before forward", "POST", b"/api/v1/buyers", _LOOPBACK + _WRITER + _BAD_KEY,
         400, "BAD_REQUEST", "create"),
    ],
)  # fmt: skip
def test_the_earlier_stage_refuses(
    tmp_path: Path,
    stages: str,
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    status: int,
    code: str,
    required: str | None,
) -> None:
    answered, envelope, audit = _call(tmp_path, method, target, headers)
    assert (answered, envelope["error_code"]) == (status, code), stages
    assert envelope["success"] is False
    assert _SAYS.get(stages, "") in envelope["message"]
    assert (audit["status"], audit["error_code"]) == (status, code)
    assert audit["required_permission"] == required
    identified = "reader" if (b"authorization", _READER[0][1]) in headers else "writer"
    assert audit["client"] == (
        "unknown" if status in (401, 404) or "caller" in stages else identified
    )
