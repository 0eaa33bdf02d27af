"""Idempotent POSTs: what keeping the Idempotency-Keys on Redis costs a call, over memory.

Usage: python bench/idempotency.py [--requests 3000] [--rounds 5] [--json F]

It starts the nginx upstream of `bench/run.py` (which answers `POST /api/v1/buyers` with ~200
bytes of JSON when the token is right), a redis-server without persistence, and two
invoisx-proxy processes in front of the upstream: `memory` (keys in its memory) and `redis`
(INVOISX_PROXY_REDIS_URL). The proxies run on CPU 1; this script and redis-server on CPU 0
(in production Redis has a machine of its own). Then, in interleaved rounds, one keep-alive
connection per target sends --requests POSTs one at a time (c=1):

- `new key`: each with an Idempotency-Key never used before, so each claims a key, goes to
  the upstream and stores its answer (on Redis: two script runs, claim and finish);
- `repeat`: each with the same key, so each is a replay of the stored answer.

It prints p50 and p99 latency per target and kind (the median across rounds), and checks the
target: added p50 of a new key on Redis over in memory at most 0.5 ms. Exit status 1 if it
fails or the run broke, 2 if nginx or redis-server is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from procs import ReadinessError, free_port
from report import check, format_checks
from services import (
    BUYERS_PATH,
    default_proxy_cmd,
    start_invoisx,
    start_nginx_upstream,
    start_redis,
)

ADDED_P50_MS = 0.5
KINDS = ("new key", "repeat")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="per target, kind and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    return parser.parse_args(argv)


def latencies(port: int, requests: int, kind: str) -> list[float]:
    """Milliseconds per POST, one at a time on one keep-alive connection; raises on a non-2xx."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    repeated = f"bench-{secrets.token_hex(8)}"
    times = []
    try:
        for _ in range(requests):
            key = repeated if kind == "repeat" else f"bench-{secrets.token_hex(8)}"
            headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
            started = time.perf_counter()
            connection.request("POST", BUYERS_PATH, body=b"{}", headers=headers)
            response = connection.getresponse()
            response.read()
            times.append((time.perf_counter() - started) * 1000)
            if response.status >= 300:
                raise RuntimeError(f"{kind} on :{port}: HTTP {response.status}")
    finally:
        connection.close()
    return times


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, dict[str, float]]]:
    token = f"ixt_bench_{secrets.token_hex(12)}"
    with contextlib.ExitStack() as stack:
        upstream_port = free_port()
        stack.callback(start_nginx_upstream(workdir, upstream_port, token, 0).stop)
        redis_port = free_port()
        stack.callback(start_redis(workdir, redis_port, cpu=0).stop)
        api_url = f"http://127.0.0.1:{upstream_port}/api/v1"
        ports = {}
        for name, env in (
            ("memory", {}),
            ("redis", {"INVOISX_PROXY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}),
        ):
            port = free_port()
            service = start_invoisx(
                default_proxy_cmd(),
                name=f"invoisx-{name}",
                workdir=workdir,
                port=port,
                api_url=api_url,
                token=token,
                cpu=1,
                extra_env=env,
            )
            stack.callback(service.stop)
            ports[name] = port
        for port in ports.values():  # warm-up
            for kind in KINDS:
                latencies(port, 300, kind)
        rounds: dict[str, dict[str, list[list[float]]]] = {
            name: {kind: [] for kind in KINDS} for name in ports
        }
        for number in range(args.rounds):
            order = list(ports) if number % 2 == 0 else list(reversed(ports))
            for name in order:
                for kind in KINDS:
                    times = latencies(ports[name], args.requests, kind)
                    rounds[name][kind].append(times)
                    print(
                        f"round {number + 1} {name:<7}{kind:<9} p50 {percentile(times, 0.5):.3f} ms"
                        f"  p99 {percentile(times, 0.99):.3f} ms",
                        flush=True,
                    )
    return {
        name: {
            kind: {
                "p50_ms": statistics.median(percentile(t, 0.5) for t in runs),
                "p99_ms": statistics.median(percentile(t, 0.99) for t in runs),
            }
            for kind, runs in kinds.items()
        }
        for name, kinds in rounds.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [program for program in ("nginx", "redis-server") if shutil.which(program) is None]
    if missing:
        print(f"missing: {', '.join(missing)} (Debian: apt-get install nginx redis-server)")
        return 2
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory(prefix="invoisx-idempotency-") as tmp:
        try:
            figures = run(args, Path(tmp))
        except (ReadinessError, RuntimeError, OSError) as error:
            print(f"the run broke: {error}")
            return 1
    print()
    for name, kinds in figures.items():
        for kind, values in kinds.items():
            print(
                f"{name:<7}{kind:<9} p50 {values['p50_ms']:.3f} ms  p99 {values['p99_ms']:.3f} ms"
            )
    added = figures["redis"]["new key"]["p50_ms"] - figures["memory"]["new key"]["p50_ms"]
    checks = [check("new key: added p50, Redis over memory (ms)", added, at_most=ADDED_P50_MS)]
    print(format_checks(checks))
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "added_p50_ms": added}, indent=2))
    return 0 if all(c.status == "PASS" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
