"""The servers the benchmarks start: nginx upstream and proxy, mitmdump, invoisx-proxy, the
InvoisX sandbox and redis-server."""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from procs import ReadinessError, Service, start_service, wait_ready

__all__ = [
    "BUYERS_BODY",
    "BUYERS_PATH",
    "Target",
    "default_proxy_cmd",
    "redis_ping",
    "start_invoisx",
    "start_mitmdump",
    "start_nginx",
    "start_nginx_proxy",
    "start_nginx_upstream",
    "start_redis",
    "start_sandbox",
    "start_streaming_upstream",
]

BUYERS_PATH = "/api/v1/buyers"
BUYERS_BODY = (
    '{"data":[{"id":"byr_01","name":"Acme Trading Sdn Bhd","tin":"C21638015020",'
    '"country":"MYS"},{"id":"byr_02","name":"Borneo Supplies","tin":"C10987654321",'
    '"country":"MYS"}],"page":1,"per_page":20,"total":2}'
)

_NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid @DIR@/nginx.pid;
error_log @DIR@/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    access_log off;
    server_tokens off;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    client_body_temp_path @DIR@/client_body;
    proxy_temp_path @DIR@/proxy;
    fastcgi_temp_path @DIR@/fastcgi;
    uwsgi_temp_path @DIR@/uwsgi;
    scgi_temp_path @DIR@/scgi;
@SERVERS@
}
"""

_UPSTREAM_SERVER = """\
    server {
        listen 127.0.0.1:@PORT@;
        default_type application/json;
        location = @PATH@ {
            if ($http_authorization != "Bearer @TOKEN@") {
                return 401 '{"error":"unauthorized"}';
            }
            return 200 '@BODY@';
        }
        location / { return 404 '{"error":"not found"}'; }
    }
"""

_PROXY_SERVER = """\
    upstream invoisx_upstream {
        server 127.0.0.1:@UPSTREAM@;
        keepalive 256;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:@PORT@;
        location /api/v1/ {
            proxy_pass http://invoisx_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer @TOKEN@";
        }
    }
"""


@dataclass(frozen=True)
class Target:
    """A URL under load; `headers` are what a client of it must send itself."""

    name: str
    port: int
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{BUYERS_PATH}"


def _fill(template: str, **values: str | int) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", str(value))
    return template


def _start_nginx(name: str, servers: str, workdir: Path, cpu: int | None) -> Service:
    confdir = workdir / name
    confdir.mkdir()
    # nginx drops worker privileges to "nobody" when started as root; they must reach the dir.
    confdir.chmod(0o755)
    workdir.chmod(0o755)
    conf = confdir / "nginx.conf"
    conf.write_text(_fill(_NGINX_CONF, DIR=str(confdir), SERVERS=servers))
    argv = ["nginx", "-p", str(confdir), "-c", str(conf), "-e", str(confdir / "error.log")]
    service = start_service(name, argv, logdir=workdir, cpu=cpu)
    service.stderr_path = confdir / "error.log"
    return service


def start_nginx(name: str, servers: str, workdir: Path, cpu: int | None) -> Service:
    """nginx with `servers` (server and map blocks) in the benchmark's http {}; not probed."""
    return _start_nginx(name, servers, workdir, cpu)


def start_nginx_upstream(workdir: Path, port: int, token: str, cpu: int | None) -> Service:
    """nginx answering GET /api/v1/buyers (~200 bytes of JSON) when the token is right."""
    server = _fill(_UPSTREAM_SERVER, PORT=port, PATH=BUYERS_PATH, TOKEN=token, BODY=BUYERS_BODY)
    service = _start_nginx("nginx-upstream", server, workdir, cpu)
    wait_ready(service, port, BUYERS_PATH, headers={"Authorization": f"Bearer {token}"})
    return service


def start_nginx_proxy(
    workdir: Path, port: int, upstream_port: int, token: str, cpu: int | None
) -> Service:
    """nginx reverse proxy with keepalive upstream connections, injecting the token."""
    server = _fill(_PROXY_SERVER, PORT=port, UPSTREAM=upstream_port, TOKEN=token)
    service = _start_nginx("nginx-proxy", server, workdir, cpu)
    wait_ready(service, port, BUYERS_PATH)
    return service


def start_mitmdump(
    mitmdump: str, workdir: Path, port: int, upstream_port: int, token: str, cpu: int | None
) -> Service:
    """mitmdump in reverse mode, quiet, adding the Authorization header to each request."""
    confdir = workdir / "mitmproxy"
    confdir.mkdir()
    argv = [
        mitmdump,
        "--mode",
        f"reverse:http://127.0.0.1:{upstream_port}/",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--quiet",
        "--set",
        f"confdir={confdir}",
        "--set",
        "flow_detail=0",
        "--set",
        "termlog_verbosity=error",
        "--modify-headers",
        f"/~q/Authorization/Bearer {token}",
    ]
    service = start_service("mitmproxy", argv, logdir=workdir, cpu=cpu)
    wait_ready(service, port, BUYERS_PATH)
    return service


def default_proxy_cmd() -> str:
    """invoisx-proxy from the venv of the running interpreter, else `python -m proxy`."""
    script = Path(sys.executable).parent / "invoisx-proxy"
    if script.exists():
        return f"{shlex.quote(str(script))} serve"
    return f"{shlex.quote(sys.executable)} -m proxy serve"


def start_invoisx(
    proxy_cmd: str,
    *,
    name: str,
    workdir: Path,
    port: int,
    api_url: str,
    token: str,
    cpu: int | None,
    probe_path: str | None = BUYERS_PATH,
    extra_env: Mapping[str, str] | None = None,
) -> Service:
    """invoisx-proxy with audit logging to a file and its stdout JSON lines to a file."""
    env = {
        **os.environ,
        "INVOISX_API_URL": api_url,
        "INVOISX_API_TOKEN": token,
        "INVOISX_TOKEN_PERMISSIONS": "create,read,update,delete",
        "INVOISX_PROXY_LOG_FILE": str(workdir / f"{name}.audit.log"),
        # The limiter stays on (its bookkeeping runs on every call) but never holds a call.
        "INVOISX_RATE_LIMIT_PER_MINUTE": "1000000000",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        **(extra_env or {}),
    }
    argv = [*shlex.split(proxy_cmd), "--host", "127.0.0.1", "--port", str(port)]
    service = start_service(name, argv, logdir=workdir, cpu=cpu, env=env)
    wait_ready(service, port, "/healthz")
    if probe_path is not None:
        wait_ready(service, port, probe_path, timeout_s=10.0)
    return service


def start_streaming_upstream(workdir: Path, port: int, token: str) -> Service:
    """The stdlib blob upstream (bench/streaming_upstream.py)."""
    script = Path(__file__).with_name("streaming_upstream.py")
    argv = [sys.executable, str(script), "--port", str(port), "--token", token]
    service = start_service("streaming-upstream", argv, logdir=workdir)
    wait_ready(service, port, "/healthz")
    return service


def start_sandbox(
    workdir: Path, port: int, rate_limit: int, *, name: str = "sandbox"
) -> tuple[Service, dict[str, str]]:
    """`invoisx-proxy sandbox` (this interpreter's `-m proxy`) with its per-token limit of
    `rate_limit` a minute; returns it and the tokens it printed, by name (`read-only`, ...).

    Readiness is probed on `/login`, outside `/api/v1`, so the probe spends no token's limit.
    """
    argv = [sys.executable, "-m", "proxy", "sandbox", "--port", str(port)]
    service = start_service(name, [*argv, "--rate-limit", str(rate_limit)], logdir=workdir)
    wait_ready(service, port, "/login")
    stdout = workdir / f"{name}.stdout.log"
    tokens: dict[str, str] = {}
    deadline = time.monotonic() + 10.0
    while not tokens and time.monotonic() < deadline:
        # "  ixs_...  read-only: read": the token, its name, its permissions.
        for line in stdout.read_text(errors="replace").splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0].startswith("ixs_") and fields[1].endswith(":"):
                tokens[fields[1].removesuffix(":")] = fields[0]
        time.sleep(0.05)
    if not tokens:
        raise ReadinessError(f"{name} printed no tokens:\n{service.tail()}")
    return service, tokens


def redis_ping(port: int, timeout: float = 1.0) -> bool:
    """Whether a Redis server on 127.0.0.1:`port` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    workdir: Path, port: int, *, name: str = "redis", cpu: int | None = None
) -> Service:
    """redis-server on 127.0.0.1:`port`, without persistence (a restart starts empty), its
    working directory `workdir/name`; returns once it answers PING. Started again with the
    same arguments after a stop, it listens on the same port, its log appended to."""
    datadir = workdir / name
    datadir.mkdir(exist_ok=True)
    argv = [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(datadir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--logfile",
        "",
    ]
    service = start_service(name, argv, logdir=workdir, cpu=cpu)
    service.stderr_path = workdir / f"{name}.stdout.log"  # its log: `--logfile ""` is stdout
    deadline = time.monotonic() + 10.0
    while not redis_ping(port):
        if not service.alive() or time.monotonic() > deadline:
            service.stop()
            raise ReadinessError(f"{name} not ready on :{port}:\n{service.tail()}")
        time.sleep(0.05)
    return service
