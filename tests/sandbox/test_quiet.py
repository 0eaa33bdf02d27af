"""A client that leaves mid-call is no server error, and a real one is one line, no traceback."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.sandbox import OneLineErrors, SandboxToken, create_sandbox_app, new_token_value
from tests.conftest import loopback_config, run_server


class Outcome:
    """Passes calls through and records how each ended: what reached the server, if anything."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.escaped: list[BaseException] = []
        self.done = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except BaseException as error:
            self.escaped.append(error)
            raise
        finally:
            self.done.set()


class Collected(logging.Handler):
    """The records of one logger, formatted as its handlers would see them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.arrived = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.arrived.set()


@contextmanager
def _collected(name: str) -> Iterator[Collected]:
    handler = Collected()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _leave_mid_body(url: str, token: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        head = (
            "POST /api/v1/buyers HTTP/1.1\r\nHost: sandbox\r\nAccept: application/json\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n"
        )
        client.sendall(head.encode() + b'{"name": "Syarik')


def test_a_client_leaving_mid_body_is_not_a_server_error() -> None:
    token = SandboxToken(new_token_value(), "tests", frozenset({"create", "read"}))
    sandbox = create_sandbox_app([token])
    outcome = Outcome(sandbox)
    with run_server(loopback_config(outcome)) as url:
        _leave_mid_body(url, token.value)
        assert outcome.done.wait(10), "the sandbox never finished the call"
        assert outcome.escaped == []
        assert sandbox.state.store.buyers == {}
        # Still serving others.
        headers = {"Authorization": f"Bearer {token.value}", "Accept": "application/json"}
        assert httpx.get(f"{url}/api/v1/buyers", headers=headers).status_code == 200


async def _broken(request: Request) -> Response:
    raise RuntimeError("the stand-in got this wrong")


def test_one_line_errors_logs_a_failure_as_one_line_without_traceback() -> None:
    app = OneLineErrors(Starlette(routes=[Route("/boom", _broken)]))
    with _collected("uvicorn.error") as log, run_server(loopback_config(app)) as url:
        response = httpx.get(f"{url}/boom")
        assert log.arrived.wait(10)
    assert response.status_code == 500
    [record] = log.records
    assert record.getMessage() == (
        "sandbox error on GET /boom: RuntimeError: the stand-in got this wrong"
    )
    assert record.exc_info is None
