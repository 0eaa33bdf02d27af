"""Shared fixtures: real servers on loopback sockets, a recording InvoisX stand-in, the proxy.

Nothing here mocks httpx or Starlette: every test talks HTTP to a uvicorn server on
127.0.0.1 with a port the OS picked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import hypothesis
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.app import create_app
from proxy.config.settings import load_settings
from proxy.sandbox import SandboxToken, create_sandbox_app, new_token_value
from proxy.server.serving import bind, server_config, serving_in_thread

TOKEN = "ixt_live_7Qw9xZ2mK4pL8sV1nB6cR3tY5uH0jD"
# The document types docs/clients-and-permissions.md names, written out rather than imported
# from the proxy, so that a type dropped from the proxy's list fails the tests that use it.
DOCUMENT_TYPES = (
    "invoices",
    "credit-notes",
    "debit-notes",
    "refund-notes",
    "self-billed-invoices",
    "self-billed-credit-notes",
    "self-billed-debit-notes",
    "self-billed-refund-notes",
)


@contextmanager
def run_server(config: uvicorn.Config) -> Iterator[str]:
    """Serve `config` on a free loopback port in a thread; yield its base URL once listening."""
    with serving_in_thread(config, bind("127.0.0.1", 0)) as url:
        yield url


def free_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with bind("127.0.0.1", 0) as probe:
        return int(probe.getsockname()[1])


def loopback_config(app: ASGIApp) -> uvicorn.Config:
    """uvicorn settings for a stand-in server: quiet, no lifespan."""
    return uvicorn.Config(app, log_config=None, lifespan="off")


@contextmanager
def raw_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> Iterator[int]:
    """An asyncio TCP server running `handle` per connection, in a thread; yields its port.

    On the way out its connections are closed and their tasks ended, as tests/faulty.py does.
    """
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    ports: list[int] = []
    stop = asyncio.Event()

    async def handle_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle_and_close, "127.0.0.1", 0)
        ports.append(server.sockets[0].getsockname()[1])
        ready.set()
        async with server:
            await stop.wait()
            server.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0)  # let the transports finish closing

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "the raw server did not start"
        yield ports[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


@dataclass
class Recorded:
    """One request as the stand-in InvoisX received it."""

    method: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> list[str]:
        wanted = name.lower().encode()
        return [value.decode("latin-1") for key, value in self.headers if key == wanted]


@dataclass
class Reply:
    """What the stand-in answers: status, headers and a body sent as the given chunks."""

    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(
        default_factory=lambda: [(b"content-type", b"application/json")]
    )
    chunks: Iterable[bytes] = (b'{"success":true,"data":[]}',)
    delay: float = 0.0


class Recorder:
    """A stand-in InvoisX that records every request and answers with `reply(request)`."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.reply: Callable[[Recorded], Reply] = lambda request: Reply()
        self.disconnects = 0
        self.incomplete = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # The request never completed, so a real server would not act on it.
                self.incomplete += 1
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        request = Recorded(
            scope["method"], scope["raw_path"], scope["query_string"], scope["headers"], bytes(body)
        )
        self.requests.append(request)
        reply = self.reply(request)
        if reply.delay and await self._client_left_within(receive, reply.delay):
            return
        await send(
            {"type": "http.response.start", "status": reply.status, "headers": reply.headers}
        )
        for chunk in reply.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _client_left_within(self, receive: Receive, seconds: float) -> bool:
        try:
            message = await asyncio.wait_for(receive(), seconds)
        except TimeoutError:
            return False
        if message["type"] == "http.disconnect":
            self.disconnects += 1
            return True
        return False


@dataclass
class RunningProxy:
    url: str
    log_path: Path

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def audit_lines(self, at_least: int = 0) -> list[dict[str, Any]]:
        # A line is written just after its response is sent; give the server a moment.
        deadline = time.monotonic() + 5
        while True:
            lines = [line for line in self.log_lines() if line["event"] == "request"]
            if len(lines) >= at_least or time.monotonic() > deadline:
                return lines
            time.sleep(0.01)

    def events(self, event: str) -> list[dict[str, Any]]:
        """The log lines with this `event` so far."""
        return [line for line in self.log_lines() if line["event"] == event]

    def wait_for_events(self, event: str, count: int, timeout: float = 5) -> list[dict[str, Any]]:
        """The lines with this `event` once there are at least `count` (AssertionError if not)."""
        deadline = time.monotonic() + timeout
        while len(found := self.events(event)) < count:
            assert time.monotonic() < deadline, f"fewer than {count} {event!r} lines"
            time.sleep(0.02)
        return found

    def last_audit(self) -> dict[str, Any]:
        """The newest audit line; only for tests that made one request to the proxy."""
        return self.audit_lines(at_least=1)[-1]

    def audit_of(self, response: httpx.Response) -> dict[str, Any]:
        """The audit line of `response`, found by its X-Request-ID."""
        request_id = response.headers["x-request-id"]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for line in self.audit_lines():
                if line["request_id"] == request_id:
                    return line
            time.sleep(0.01)
        raise AssertionError(f"no audit line for request {request_id}")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No INVOISX_* variable from the developer's shell may leak into a test."""
    for name in list(os.environ):
        if name.startswith("INVOISX_"):
            monkeypatch.delenv(name)


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    """The recording stand-in and its API base URL (`.../api/v1`)."""
    stand_in = Recorder()
    with run_server(loopback_config(stand_in)) as url:
        yield stand_in, f"{url}/api/v1"


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., RunningProxy]]:
    """Start the proxy in front of `api_url`; keyword arguments are settings overrides, and
    `server` options for uvicorn."""
    numbers = itertools.count()
    with ExitStack() as stack:

        def start(
            api_url: str, server: dict[str, Any] | None = None, **overrides: Any
        ) -> RunningProxy:
            log_path = tmp_path / f"audit-{next(numbers)}.log"
            values: dict[str, Any] = {
                "api_token": TOKEN,
                "api_url": api_url,
                "log_file": log_path,
                "token_permissions": "create,read,update,delete",
                # The 60-a-minute default would throttle the tests; test_ratelimit turns it on.
                "rate_limit_per_minute": 0,
            }
            settings = load_settings(env_file=None, **(values | overrides))
            options = {"log_config": None} | (server or {})
            config = server_config(create_app(settings), settings, **options)
            url = stack.enter_context(run_server(config))
            return RunningProxy(url=url, log_path=log_path)

        yield start


@pytest.fixture
def proxy(recorder: tuple[Recorder, str], start_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    """The proxy with every permission, in front of the recording stand-in."""
    return start_proxy(recorder[1])


@dataclass
class Sandbox:
    """A running sandbox InvoisX: its app (for state), API base URL and one token."""

    app: Any
    url: str
    token: SandboxToken


@pytest.fixture
def start_sandbox_upstream() -> Iterator[Callable[..., Sandbox]]:
    """Start a sandbox InvoisX with one token; keyword arguments go to `create_sandbox_app`."""
    with ExitStack() as stack:

        def start(permissions: str = "create,read,update,delete", **options: Any) -> Sandbox:
            token = SandboxToken(new_token_value(), "tests", frozenset(permissions.split(",")))
            app = create_sandbox_app([token], **options)
            url = stack.enter_context(run_server(loopback_config(app)))
            return Sandbox(app=app, url=f"{url}/api/v1", token=token)

        yield start


def subprocess_env(**values: str) -> dict[str, str]:
    """This process's environment without INVOISX_* variables, plus `values`."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("INVOISX_")}
    return base | values


class ProxyProcess:
    """`python -m proxy serve` as a real process (signals need it), its output in a file."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_path = tmp_path / f"proxy-{self.port}.out"
        with self.output_path.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--port", str(self.port)],
                env=subprocess_env(**env),
                cwd=tmp_path,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"the proxy did not start:\n{self.output_path.read_text()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def lines(self) -> list[dict[str, Any]]:
        """Every JSON line the process printed so far."""
        return [json.loads(line) for line in self.output_path.read_text().splitlines()]

    def wait_for(self, event: str, timeout: float = 5) -> dict[str, Any]:
        """The first line with this `event`, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.lines() if line["event"] == event]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event!r} line:\n{self.output_path.read_text()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@pytest.fixture
def spawn_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start proxy processes with the given INVOISX_* environment; all are killed at the end."""
    started: list[ProxyProcess] = []

    def spawn(**env: str) -> ProxyProcess:
        started.append(ProxyProcess(tmp_path, env))
        return started[-1]

    yield spawn
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


class RedisServer:
    """A redis-server process of one test's own: a free loopback port, its files in `directory`.

    Nothing is saved to disk unless `appendonly`, whose file then carries the data across
    `stop()` and `start()`. The server's log (its stdout) is `directory / "redis.log"`.
    """

    def __init__(
        self,
        program: str,
        directory: Path,
        *,
        unix_socket: bool = False,
        appendonly: bool = False,
        args: Iterable[str] = (),
    ) -> None:
        self.port = free_port()
        self.directory = directory
        self.socket_path = directory / "redis.sock" if unix_socket else None
        self.log_path = directory / "redis.log"
        self._argv = [
            program,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory)),
            *("--save", "", "--appendonly", "yes" if appendonly else "no", "--daemonize", "no"),
        ]
        if self.socket_path is not None:
            self._argv += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        self._argv += args
        self._process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        if self.socket_path is None:
            raise AttributeError("no unix socket was asked for: start_redis(unix_socket=True)")
        return f"unix://{self.socket_path}?db=0"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start redis-server (again: same port, same directory); return once it answers PING."""
        assert not self.running, f"redis-server {self.pid} is already running"
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                self._argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._process = process
        deadline = time.monotonic() + 10
        while not self._answers_ping():
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(f"redis-server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.02)

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM, a clean shutdown (the append-only file is flushed), or SIGKILL, a crash;
        then wait for the process, so that the port refuses connections once this returns."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _answers_ping(self) -> bool:
        # While it loads the append-only file, the server answers -LOADING instead.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                probe.sendall(b"PING\r\n")
                return probe.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class StartRedis(Protocol):
    def __call__(
        self, *, unix_socket: bool = False, appendonly: bool = False, args: Iterable[str] = ()
    ) -> RedisServer: ...


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[StartRedis]:
    """Start redis-server processes of this test's own (`args`: more redis-server options);
    all are killed at the end. Without redis-server the test is skipped, except under CI,
    where .ci/run installs it."""
    program = shutil.which("redis-server")
    if program is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing under CI, where .ci/run installs it")
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    numbers = itertools.count()
    started: list[RedisServer] = []

    def start(
        *, unix_socket: bool = False, appendonly: bool = False, args: Iterable[str] = ()
    ) -> RedisServer:
        directory = tmp_path / f"redis-{next(numbers)}"
        directory.mkdir()
        server = RedisServer(
            program, directory, unix_socket=unix_socket, appendonly=appendonly, args=args
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(kill=True)


# Hypothesis profiles for tests/test_properties.py: "ci" by default, "long" for a thorough run
# (`--hypothesis-profile=long`); INVOISX_HYPOTHESIS_EXAMPLES sets the examples per test in
# either. Registered here because the plugin loads the profile named on the command line
# before any test module is imported.
_EXAMPLES = os.environ.get("INVOISX_HYPOTHESIS_EXAMPLES")
hypothesis.settings.register_profile("ci", max_examples=int(_EXAMPLES or 150), deadline=None)
hypothesis.settings.register_profile("long", max_examples=int(_EXAMPLES or 12_000), deadline=None)
if hypothesis.settings.get_current_profile_name() == "default":
    hypothesis.settings.load_profile("ci")
