"""Soak: invoisx-proxy under 1,000 connections, a slowloris attack and token rotation at once.

Usage: python bench/soak.py [--connections 1000] [--duration 60] [--slowloris 200]
                            [--rotate-every 3] [--upstream auto|nginx|python] [--json FILE]

It starts a fast stand-in InvoisX (nginx when installed, else a stdlib asyncio server in a
child process; both accept either of two tokens) and the proxy as `python -m proxy serve`,
reading its token from a file and writing its audit log to a file. Then --connections
keep-alive clients call `GET /api/v1/buyers` as fast as they can: a --warm-up (3 s, while the
connections open), then --duration seconds in three equal windows:

1. the load alone;
2. the load plus --slowloris connections that send their request headers one byte at a time
   (one every --slowloris-interval, 0.5 s), never finishing them;
3. the load alone again (the slowloris connections closed).

Throughout, the token file is rewritten every --rotate-every seconds, alternating the two
tokens, in place and by rename in turn. Memory is the proxy's VmRSS (its process tree).

Targets (exit status 1 if one is missed, 2 when a prerequisite is missing):

- no failed call, warm-up included: every answer 2xx, no socket error, no timeout (10 s);
- slowloris: window 2's p99 within 2x (or 50 ms over) the mean of windows 1 and 3, and its
  req/s at least 0.7x their mean;
- rotation: every rewrite picked up (a `token_reloaded` line each), both tokens carried calls;
- memory: peak RSS at most --max-rss-mb (256);
- every answered call has its audit line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import resource
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadgen import _read_response
from procs import RssSampler, Service, free_port, process_tree, rss_mb, start_service, wait_ready
from services import BUYERS_BODY, BUYERS_PATH, start_nginx

REPO = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT = 10.0
WARM_UP = "warm-up"
WINDOWS = (WARM_UP, "load", "load + slowloris", "load again")

_NGINX_UPSTREAM = """\
    map_hash_bucket_size 128;
    map $http_authorization $soak_token_ok {
        default 0;
        "Bearer @A@" 1;
        "Bearer @B@" 1;
    }
    server {
        listen 127.0.0.1:@PORT@;
        default_type application/json;
        location = @PATH@ {
            if ($soak_token_ok = 0) {
                return 401 '{"success":false,"error_code":"UNAUTHORIZED"}';
            }
            return 200 '@BODY@';
        }
        location / { return 404 '{"success":false,"error_code":"NOT_FOUND"}'; }
    }
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000, help="clients (1000)")
    parser.add_argument("--duration", type=float, default=60, help="seconds in all (60)")
    parser.add_argument("--slowloris", type=int, default=200, help="slow connections (200)")
    parser.add_argument(
        "--slowloris-interval", type=float, default=0.5, help="seconds between bytes (0.5)"
    )
    parser.add_argument("--rotate-every", type=float, default=3, help="seconds (3)")
    parser.add_argument(
        "--warm-up", type=float, default=3, help="seconds before the windows, not timed (3)"
    )
    parser.add_argument("--max-rss-mb", type=float, default=256, help="peak RSS target (256)")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument("--json", type=Path, help="write all figures to this file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.connections < 1 or args.duration < 3 or args.rotate_every <= 0:
        parser.error("--connections >= 1, --duration >= 3 and --rotate-every > 0")
    return args


# --- the stdlib stand-in, when nginx is not installed -------------------------------------


class _Upstream(asyncio.Protocol):
    """GET /api/v1/buyers with either token: 200 and the benchmark's JSON; else 401/404."""

    def __init__(self, tokens: frozenset[bytes]) -> None:
        self._tokens = tokens
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            target = lines[0].split(b" ")[1] if lines[0].count(b" ") >= 2 else b""
            authorization = b""
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"authorization":
                    authorization = value.strip()
            if target.split(b"?")[0] != BUYERS_PATH.encode():
                status, body = b"404 Not Found", b'{"success":false,"error_code":"NOT_FOUND"}'
            elif authorization not in self._tokens:
                status, body = b"401 Unauthorized", b'{"success":false}'
            else:
                status, body = b"200 OK", BUYERS_BODY.encode()
            self._transport.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )


def serve_upstream(port: int, tokens: list[str]) -> int:
    """Run the stdlib stand-in until killed (the soak starts it as a child process)."""
    accepted = frozenset(f"Bearer {token}".encode() for token in tokens)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Upstream(accepted), "127.0.0.1", port, backlog=4096
        )
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    return 0


# --- the run -------------------------------------------------------------------------------


@dataclass
class Window:
    """The calls started in one window of the run."""

    name: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def figures(self) -> dict[str, float | int | str]:
        done = sorted(self.latencies)

        def percentile(share: float) -> float:
            return done[min(len(done) - 1, int(share * len(done)))] * 1000 if done else 0.0

        return {
            "window": self.name,
            "seconds": round(self.seconds, 1),
            "requests": len(done) + self.errors.total(),
            "rps": round(len(done) / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(percentile(0.50), 2),
            "p99_ms": round(percentile(0.99), 2),
            "max_ms": round(done[-1] * 1000, 2) if done else 0.0,
            "errors": self.errors.total(),
        }


@dataclass
class Soak:
    args: argparse.Namespace
    workdir: Path
    tokens: tuple[str, str]
    proxy_port: int = 0
    windows: list[Window] = field(default_factory=lambda: [Window(name) for name in WINDOWS])
    current: int = 0
    stop: bool = False
    rotations: Counter[str] = field(default_factory=Counter)
    slowloris: Counter[str] = field(default_factory=Counter)

    @property
    def token_file(self) -> Path:
        return self.workdir / "invoisx_token"

    def write_token(self, token: str, *, in_place: bool) -> None:
        if in_place:
            self.token_file.write_text(token + "\n")
            return
        fresh = self.token_file.with_suffix(".new")
        fresh.write_text(token + "\n")
        fresh.replace(self.token_file)

    async def client(self) -> None:
        request = (
            f"GET {BUYERS_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{self.proxy_port}\r\n"
            "Accept: application/json\r\n\r\n"
        ).encode()
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not self.stop:
            window = self.windows[self.current]
            started = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    if streams is None:
                        streams = await asyncio.open_connection("127.0.0.1", self.proxy_port)
                    reader, writer = streams
                    writer.write(request)
                    await writer.drain()
                    status, keep_alive = await _read_response(reader)
            except TimeoutError:
                window.errors["timeout"] += 1
                status, keep_alive = 0, False
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                window.errors["socket error"] += 1
                status, keep_alive = 0, False
            else:
                if 200 <= status < 300:
                    window.latencies.append(time.perf_counter() - started)
                else:
                    window.errors[f"HTTP {status}"] += 1
            if not keep_alive and streams is not None:
                streams[1].close()
                streams = None
        if streams is not None:
            streams[1].close()

    async def slow_client(self, until: float) -> None:
        """Send a request's headers one byte at a time until `until`, then hang up."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy_port)
        except OSError:
            self.slowloris["refused"] += 1
            return
        self.slowloris["connected"] += 1
        head = f"GET {BUYERS_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        padding = b"X-Padding: " + b"a" * 100_000
        try:
            for byte in head + padding:
                if time.monotonic() >= until:
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                self.slowloris["bytes"] += 1
                # Stop early if the proxy hung up on us.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.args.slowloris_interval):
                        if not await reader.read(1):
                            self.slowloris["closed by the proxy"] += 1
                            return
                        self.slowloris["answered"] += 1
                        return
        except OSError:
            self.slowloris["closed by the proxy"] += 1
        finally:
            writer.close()

    async def rotate(self) -> None:
        number = 0
        while not self.stop:
            await asyncio.sleep(self.args.rotate_every)
            if self.stop:
                break
            number += 1
            in_place = number % 2 == 1
            self.write_token(self.tokens[number % 2], in_place=in_place)
            self.rotations["in place" if in_place else "by rename"] += 1

    async def run(self) -> None:
        window_seconds = self.args.duration / (len(WINDOWS) - 1)
        clients = [asyncio.ensure_future(self.client()) for _ in range(self.args.connections)]
        rotation = asyncio.ensure_future(self.rotate())
        slow: list[asyncio.Future[None]] = []
        for index, window in enumerate(self.windows):
            self.current = index
            started = time.monotonic()
            seconds = self.args.warm_up if window.name == WARM_UP else window_seconds
            log(f"{window.name} ({seconds:.0f} s)")
            if window.name == "load + slowloris":
                until = started + window_seconds
                slow = [
                    asyncio.ensure_future(self.slow_client(until))
                    for _ in range(self.args.slowloris)
                ]
            await asyncio.sleep(seconds)
            window.seconds = time.monotonic() - started
        self.stop = True
        await asyncio.gather(*clients, *slow, rotation)


def raise_open_files(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it); return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _start_upstream(
    args: argparse.Namespace, workdir: Path, tokens: tuple[str, str], cpu: int | None
) -> tuple[Service, int]:
    port = free_port()
    use_nginx = args.upstream == "nginx" or (
        args.upstream == "auto" and shutil.which("nginx") is not None
    )
    if use_nginx:
        server = _NGINX_UPSTREAM
        values = {"A": tokens[0], "B": tokens[1], "PORT": port}
        values |= {"PATH": BUYERS_PATH, "BODY": BUYERS_BODY}
        for key, value in values.items():
            server = server.replace(f"@{key}@", str(value))
        service = start_nginx("nginx-upstream", server, workdir, cpu)
    else:
        argv = [sys.executable, __file__, "--serve-upstream", str(port)]
        argv += ["--tokens", ",".join(tokens)]
        service = start_service("python-upstream", argv, logdir=workdir, cpu=cpu)
    for token in tokens:
        wait_ready(service, port, BUYERS_PATH, headers={"Authorization": f"Bearer {token}"})
    return service, port


def _start_proxy(soak: Soak, upstream_port: int, cpu: int | None) -> Service:
    soak.proxy_port = free_port()
    env = {
        **os.environ,
        "INVOISX_API_URL": f"http://127.0.0.1:{upstream_port}/api/v1",
        "INVOISX_API_TOKEN_FILE": str(soak.token_file),
        "INVOISX_TOKEN_PERMISSIONS": "read",
        "INVOISX_PROXY_LOG_FILE": str(soak.workdir / "audit.log"),
        "INVOISX_PROXY_RELOAD_INTERVAL": "1",
        # The proxy's own pacing of InvoisX's 60 calls a minute would be the bottleneck here.
        "INVOISX_RATE_LIMIT_PER_MINUTE": "0",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "PYTHONPATH": str(REPO),
    }
    argv = [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1"]
    argv += ["--port", str(soak.proxy_port)]
    service = start_service("invoisx-proxy", argv, logdir=soak.workdir, cpu=cpu, env=env)
    wait_ready(service, soak.proxy_port, "/healthz")
    wait_ready(service, soak.proxy_port, BUYERS_PATH)
    return service


def _audit_figures(workdir: Path, tokens: tuple[str, str]) -> dict[str, object]:
    per_token: Counter[str] = Counter()
    events: Counter[str] = Counter()
    calls = 0
    with (workdir / "audit.log").open() as lines:
        for text in lines:
            line = json.loads(text)
            events[line["event"]] += 1
            if line["event"] == "request" and line.get("path") == BUYERS_PATH:
                calls += 1
                per_token[line.get("token_fingerprint", "?")] += 1
    names = {_fingerprint(tokens[0]): "token A", _fingerprint(tokens[1]): "token B"}
    return {
        "audited_calls": calls,
        "calls_per_token": {names.get(key, key): count for key, count in per_token.items()},
        "token_reloaded": events["token_reloaded"],
        "token_reload_failed": events["token_reload_failed"],
    }


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    figure: str


def checks(figures: dict[str, object], args: argparse.Namespace) -> list[Check]:
    windows = figures["windows"]
    assert isinstance(windows, list)
    # The load alone before and after is the baseline for the window under attack.
    before, attacked, after = windows[1:]
    base = {
        "p99_ms": (before["p99_ms"] + after["p99_ms"]) / 2,
        "rps": (before["rps"] + after["rps"]) / 2,
    }
    errors = sum(window["errors"] for window in windows)
    answered = sum(window["requests"] - window["errors"] for window in windows)
    audit = figures["audit"]
    assert isinstance(audit, dict)
    rotations = sum(figures["rotations"].values())  # type: ignore[attr-defined]
    per_token = audit["calls_per_token"]
    rss = figures["rss_mb"]
    assert isinstance(rss, dict)
    p99_limit = max(2 * base["p99_ms"], base["p99_ms"] + 50)
    return [
        Check("failed calls, all windows", errors == 0, f"{errors} of {answered + errors}"),
        Check(
            "slowloris: p99 within max(2x, +50 ms) of the load alone",
            attacked["p99_ms"] <= p99_limit,
            f"{attacked['p99_ms']:.1f} ms (load alone: {base['p99_ms']:.1f} ms)",
        ),
        Check(
            "slowloris: req/s >= 0.7x the load alone",
            attacked["rps"] >= 0.7 * base["rps"],
            f"{attacked['rps']:.0f} (load alone: {base['rps']:.0f})",
        ),
        Check(
            "rotation: every rewrite reloaded",
            audit["token_reloaded"] >= rotations,
            f"{audit['token_reloaded']} reloads for {rotations} rewrites",
        ),
        Check(
            "rotation: both tokens carried calls",
            len([count for count in per_token.values() if count]) == 2,
            ", ".join(f"{name}: {count}" for name, count in sorted(per_token.items())),
        ),
        Check(
            f"peak RSS <= {args.max_rss_mb:.0f} MB",
            rss["peak"] <= args.max_rss_mb,
            f"{rss['peak']:.1f} MB",
        ),
        Check(
            "every answered call audited",
            audit["audited_calls"] >= answered,
            f"{audit['audited_calls']} lines, {answered} answers",
        ),
    ]


def _cell(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(rows: list[dict[str, object]]) -> str:
    columns = list(rows[0])
    widths = {
        column: max(len(column), *(len(_cell(row[column])) for row in rows)) for column in columns
    }
    lines = [[column.rjust(widths[column]) for column in columns]]
    lines += [[_cell(row[column]).rjust(widths[column]) for column in columns] for row in rows]
    return "\n".join("  ".join(line) for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream:
        return serve_upstream(args.serve_upstream, args.tokens.split(","))
    if args.upstream == "nginx" and shutil.which("nginx") is None:
        log("missing prerequisite: nginx (apt-get install nginx), or use --upstream python")
        return 2
    limit = raise_open_files(4 * (args.connections + args.slowloris) + 1024)
    if limit < 2 * (args.connections + args.slowloris) + 256:
        log(f"RLIMIT_NOFILE is {limit}: too low for {args.connections} connections")
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    driver, server = (None, None) if args.no_pin or len(cpus) < 2 else (cpus[0], cpus[1])
    if driver is not None:
        os.sched_setaffinity(0, {driver})
    tokens = ("ixt_soak_a_" + secrets.token_hex(16), "ixt_soak_b_" + secrets.token_hex(16))
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="invoisx-soak-")))
        soak = Soak(args, workdir, tokens)
        soak.write_token(tokens[0], in_place=True)
        upstream, upstream_port = _start_upstream(args, workdir, tokens, driver)
        stack.callback(upstream.stop)
        proxy = _start_proxy(soak, upstream_port, server)
        stack.callback(proxy.stop)
        pids = process_tree(proxy.pid)
        log(f"upstream: {upstream.name}; proxy pid {proxy.pid}; RLIMIT_NOFILE {limit}")
        with RssSampler(pids, interval_s=0.25) as sampler:
            asyncio.run(soak.run())
            time.sleep(2)  # let the proxy close what the clients left
        end_rss = rss_mb(pids)
        time.sleep(0.5)  # the last audit lines follow their responses
        if not proxy.alive():
            log(f"the proxy died:\n{proxy.tail()}")
            return 1
        figures: dict[str, object] = {
            "args": {key: value for key, value in vars(args).items() if key != "json"},
            "upstream": upstream.name,
            "windows": [window.figures() for window in soak.windows],
            "errors": {window.name: dict(window.errors) for window in soak.windows},
            "rss_mb": {
                "start": round(sampler.baseline_mb, 1),
                "peak": round(sampler.peak_mb, 1),
                "end": round(end_rss, 1),
            },
            "rotations": dict(soak.rotations),
            "slowloris": dict(soak.slowloris),
            "audit": _audit_figures(workdir, tokens),
        }
    results = checks(figures, args)
    figures["checks"] = [asdict(check) for check in results]
    print(_table(figures["windows"]))  # type: ignore[arg-type]
    rss = figures["rss_mb"]
    assert isinstance(rss, dict)
    print(f"\nproxy RSS (MB): start {rss['start']}, peak {rss['peak']}, end {rss['end']}")
    print(f"token rewrites: {dict(soak.rotations)}; audit: {figures['audit']}")
    print(f"slowloris: {dict(soak.slowloris)}")
    for window in soak.windows:
        if window.errors:
            print(f"errors in {window.name}: {dict(window.errors)}")
    print()
    for check in results:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.name}: {check.figure}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(check.passed for check in results) else 1


if __name__ == "__main__":
    sys.exit(main())
