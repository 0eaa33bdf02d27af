"""The container: the image's own command line, run here as the image would run it.

No Docker engine runs on the development machine or in CI, so the final stage of the
Dockerfile is read instead (its ENV, ENTRYPOINT + CMD, USER and HEALTHCHECK) and that command
runs from this venv as a non-root user, with the token in a secret file, in front of a local
stand-in InvoisX. The compose file is checked against the Dockerfile the same way.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TOKEN, Recorder, Reply, StartRedis, free_port, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"


@dataclass(frozen=True)
class FinalStage:
    """What the final stage of the Dockerfile says about running the image."""

    env: dict[str, str]
    command: list[str]
    user: str
    healthcheck: list[str]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def _env_pairs(arguments: str) -> dict[str, str]:
    words = shlex.split(arguments)
    if "=" not in words[0]:  # the legacy `ENV NAME value` form
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def _exec_form(arguments: str) -> list[str]:
    # The shell form would run under /bin/sh, which then gets SIGTERM instead of the proxy.
    words = json.loads(arguments)
    assert isinstance(words, list), f"not the exec (JSON) form: {arguments}"
    return [str(word) for word in words]


def final_stage(text: str) -> FinalStage:
    """Parse the instructions after the last FROM."""
    instructions = _instructions(text)
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    env: dict[str, str] = {}
    found: dict[str, str] = {}
    for keyword, arguments in instructions[last_from + 1 :]:
        if keyword == "ENV":
            env |= _env_pairs(arguments)
        else:
            found[keyword] = arguments
    health_options, _, health_command = found["HEALTHCHECK"].partition("CMD ")
    assert health_command, f"HEALTHCHECK without CMD: {health_options}"
    return FinalStage(
        env=env,
        command=_exec_form(found["ENTRYPOINT"]) + _exec_form(found.get("CMD", "[]")),
        user=found["USER"],
        healthcheck=_exec_form(health_command),
    )


@pytest.fixture(scope="module")
def stage() -> FinalStage:
    return final_stage(DOCKERFILE.read_text())


def _local(argv: list[str]) -> list[str]:
    """`argv` with its program from this venv, as the image's PATH takes it from the image's."""
    program = Path(sys.executable).parent / argv[0]
    assert program.is_file(), f"{argv[0]} is not installed next to {sys.executable}"
    return [str(program), *argv[1:]]


def _container_env(stage: FinalStage, **overrides: str) -> dict[str, str]:
    """The image's ENV on top of this environment; this venv plays the image's venv in PATH."""
    image = {name: value for name, value in stage.env.items() if name != "PATH"}
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess_env(**image) | {"PATH": path} | overrides


@dataclass(frozen=True)
class NonRoot:
    """How to start a process as a non-root user, like the image's USER."""

    uid: int
    gid: int
    prefix: list[str]
    options: dict[str, Any]


def _nobody_can_run_python(nobody: pwd.struct_passwd) -> bool:
    try:
        subprocess.run(
            [sys.executable, "-c", ""],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            cwd="/",
            check=True,
        )
    except PermissionError:
        return False
    return True


@pytest.fixture(scope="module")
def non_root() -> NonRoot:
    """Ourselves when not root; otherwise `nobody` with no supplementary groups."""
    if os.geteuid() != 0:
        return NonRoot(os.getuid(), os.getgid(), [], {})
    nobody = pwd.getpwnam("nobody")
    drop = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    if _nobody_can_run_python(nobody):
        return NonRoot(nobody.pw_uid, nobody.pw_gid, [], drop)
    # This interpreter lives under a directory only root may enter (pyenv under /root, as on
    # the development machine), unlike the image's /opt venv. setpriv lets `nobody` pass such
    # directories with CAP_DAC_READ_SEARCH and nothing else: no write beyond what nobody owns,
    # though it could read the secret file even if it were not given to nobody.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip(f"nobody cannot run {sys.executable} and setpriv is missing")
    grant = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    ids = [f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    return NonRoot(nobody.pw_uid, nobody.pw_gid, [setpriv, *ids, *grant], {})


@pytest.fixture
def workdir(non_root: NonRoot) -> Iterator[Path]:
    """A directory the non-root user owns, for the secret file and the output."""
    # Not tmp_path: pytest makes its base directory 0700 for root, closed to `nobody`.
    path = Path(tempfile.mkdtemp(prefix="invoisx-proxy-image-"))
    os.chown(path, non_root.uid, non_root.gid)
    yield path
    shutil.rmtree(path)


def _secret_file(directory: Path, non_root: NonRoot) -> Path:
    # As docs/docker.md asks of ./secrets/invoisx_token: readable by the image's user, no one else.
    secret = directory / "invoisx_token"
    secret.write_text(f"{TOKEN}\n")
    os.chown(secret, non_root.uid, non_root.gid)
    secret.chmod(0o400)
    return secret


@dataclass
class ImageProcess:
    process: subprocess.Popen[bytes]
    port: int
    output: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uids(self) -> list[int]:
        """Real, effective, saved and filesystem uid, from /proc."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        return [int(value) for value in line.split()[1:]]


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz").status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def _run_image_command(
    stage: FinalStage, non_root: NonRoot, workdir: Path, api_url: str
) -> Iterator[ImageProcess]:
    """The image's command as its user, until it answers /healthz; killed if still running."""
    port = free_port()
    env = _container_env(
        stage,
        INVOISX_API_TOKEN_FILE=str(_secret_file(workdir, non_root)),
        INVOISX_PROXY_PORT=str(port),
        INVOISX_API_URL=api_url,
        INVOISX_PROXY_ALLOW_ANONYMOUS="true",
    )
    output = workdir / "output.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [*non_root.prefix, *_local(stage.command)],
            env=env,
            cwd=workdir,
            stdout=sink,
            stderr=subprocess.STDOUT,
            **non_root.options,
        )
    running = ImageProcess(process, port, output)
    try:
        deadline = time.monotonic() + 15
        while not _answers(running.url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the image's command did not start:\n{output.read_text()}")
            time.sleep(0.05)
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture
def image(
    stage: FinalStage, non_root: NonRoot, workdir: Path, recorder: tuple[Recorder, str]
) -> Iterator[ImageProcess]:
    """The image's command in front of the recording stand-in."""
    with _run_image_command(stage, non_root, workdir, recorder[1]) as running:
        yield running


def _healthcheck(stage: FinalStage, port: int) -> int:
    """Exit status of the HEALTHCHECK command, the container's port set as the image sets it."""
    env = _container_env(stage, INVOISX_PROXY_PORT=str(port))
    return subprocess.run(
        _local(stage.healthcheck), env=env, capture_output=True, timeout=30
    ).returncode


def test_final_stage_runs_the_proxy_as_a_fixed_non_root_user(stage: FinalStage) -> None:
    user, _, group = stage.user.partition(":")
    assert user.isdigit() and int(user) != 0, "numeric, so runAsNonRoot can verify it"
    assert not group or int(group) != 0
    assert stage.command[:2] == ["invoisx-proxy", "serve"]
    assert stage.env["INVOISX_PROXY_HOST"] == "0.0.0.0"
    assert stage.env["INVOISX_API_TOKEN_FILE"].startswith("/run/secrets/")
    assert "INVOISX_API_TOKEN" not in stage.env


def test_image_command_serves_and_sends_the_secret_file_token(
    image: ImageProcess, recorder: tuple[Recorder, str]
) -> None:
    stand_in, _ = recorder
    assert httpx.get(f"{image.url}/healthz").status_code == 200

    response = httpx.get(f"{image.url}/api/v1/buyers")

    assert response.status_code == 200, response.text
    (request,) = stand_in.requests
    assert request.raw_path == b"/api/v1/buyers"
    assert request.header("authorization") == [f"Bearer {TOKEN}"]


def test_healthcheck_passes_against_the_image_and_fails_otherwise(
    image: ImageProcess, stage: FinalStage, recorder: tuple[Recorder, str]
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = lambda request: Reply(status=503)
    unhealthy_port = int(httpx.URL(upstream).port or 0)

    assert _healthcheck(stage, image.port) == 0
    assert _healthcheck(stage, free_port()) != 0, "nothing listens"
    assert _healthcheck(stage, unhealthy_port) != 0, "a 503 answer"


def test_image_command_runs_as_non_root_and_exits_0_on_sigterm(
    image: ImageProcess, non_root: NonRoot
) -> None:
    assert non_root.uid != 0
    assert image.uids() == [non_root.uid] * 4

    image.process.send_signal(signal.SIGTERM)

    assert image.process.wait(timeout=30) == 0, image.output.read_text()


# The compose file, read with PyYAML when it is installed (uvicorn[standard] brings it).


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def _profile(service: dict[str, Any]) -> list[str]:
    return list(service.get("profiles", []))


def test_compose_proxy_is_a_sidecar_with_the_token_as_a_secret(
    compose: dict[str, Any], stage: FinalStage
) -> None:
    proxy = compose["services"]["invoisx-proxy"]
    assert "ports" not in proxy, "a sidecar: reachable only on the compose network"
    (secret,) = proxy["secrets"]
    assert f"/run/secrets/{secret}" == stage.env["INVOISX_API_TOKEN_FILE"]
    assert compose["secrets"][secret]["file"].startswith("./secrets/")
    assert "secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "INVOISX_API_TOKEN" not in proxy.get("environment", {})


def test_compose_example_apps_call_a_proxy_of_their_own_profile(
    compose: dict[str, Any], stage: FinalStage
) -> None:
    services = compose["services"]
    apps = {name: service for name, service in services.items() if name.startswith("example-app")}
    assert len(apps) == 3
    for name, app in apps.items():
        url = httpx.URL(app["environment"]["INVOISX_BASE_URL"])
        target = services[url.host]
        assert url.port == int(stage.env["INVOISX_PROXY_PORT"]), name
        assert _profile(target) == _profile(app), name
        assert list(app["depends_on"]) == [url.host], name
        assert "secrets" not in app, f"{name} knows only the proxy's URL"


def test_compose_replicas_share_the_redis_service_and_the_default_stays_embedded(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    replica = services["invoisx-proxy-replica"]
    assert replica["deploy"]["replicas"] >= 2
    url = httpx.URL(replica["environment"]["INVOISX_PROXY_REDIS_URL"])
    assert (url.scheme, url.port) == ("redis", 6379)
    redis = services[url.host]
    assert replica["depends_on"] == {url.host: {"condition": "service_healthy"}}
    assert _profile(redis) == _profile(replica) == ["replicas"]
    assert replica["secrets"] == services["invoisx-proxy"]["secrets"]
    assert "ports" not in replica and "ports" not in redis, "reachable only on the network"
    # Without a profile, nothing needs Redis: the proxy keeps its budget in its process.
    for name, service in services.items():
        if not _profile(service):
            assert "INVOISX_PROXY_REDIS_URL" not in service.get("environment", {}), name


def test_compose_redis_keeps_an_append_only_file_on_a_named_volume(
    compose: dict[str, Any],
) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:")
    command = list(redis["command"])
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    (volume,) = redis["volumes"]
    name, _, target = volume.partition(":")
    assert target == "/data" and name in compose["volumes"], "a named volume, not the image"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert redis["read_only"] is True
    assert redis["cap_drop"] == ["ALL"] and redis["user"] != "0"


def test_compose_redis_command_replays_its_file_after_a_kill(
    compose: dict[str, Any], start_redis: StartRedis
) -> None:
    # The service's own options, here with Debian's redis-server; later options win over
    # the fixture's own --appendonly no.
    _, *options = compose["services"]["redis"]["command"]
    server = start_redis(args=options)

    def call(*command: str) -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
            connection.sendall(" ".join(command).encode() + b"\r\n")
            return connection.recv(1024)

    assert call("CONFIG", "GET", "appendonly").endswith(b"$3\r\nyes\r\n")
    assert call("SET", "spent", "7") == b"+OK\r\n"
    # A crash of the process alone loses nothing: Redis writes to the file before it answers
    # (unless an fsync is slow), and the kernel keeps what was written. The second everysec
    # may lose is for a crash of the host.
    server.stop(kill=True)
    server.start()

    assert call("GET", "spent") == b"$1\r\n7\r\n"


def test_compose_demo_command_runs_its_tour(compose: dict[str, Any]) -> None:
    demo = next(s for s in compose["services"].values() if "demo" in _profile(s) and "command" in s)
    command = list(demo["command"])
    command[command.index("--port") + 1] = str(free_port())

    result = subprocess.run(
        _local(["invoisx-proxy", *command, "--tour"]),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Tour passed" in result.stdout
