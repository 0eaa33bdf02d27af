"""Benchmark invoisx-proxy against nginx and mitmproxy baselines and check its targets.

Usage: python bench/run.py [--duration S] [--rounds N] [--only T,...] [--json FILE] ...
       python bench/run.py --setup      # install mitmproxy into bench/.venv-mitm

Exit status: 0 all targets met, 1 a target failed (or the run broke), 2 prerequisites missing.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadgen import CountedLoad, drive
from procs import ReadinessError, Service, free_port, process_tree, rss_mb, wait_idle
from report import Check, Summary, check, format_checks, format_table, ratios, summarise
from services import (
    BUYERS_PATH,
    Target,
    default_proxy_cmd,
    start_invoisx,
    start_mitmdump,
    start_nginx_proxy,
    start_nginx_upstream,
    start_redis,
    start_streaming_upstream,
)
from streaming import Transfer, download, upload
from wrk import WrkError, WrkResult, run_wrk

TARGETS = ("direct", "nginx-proxy", "mitmproxy", "invoisx-proxy", "invoisx-proxy-redis")
INVOISX_TARGETS = ("invoisx-proxy", "invoisx-proxy-redis")
REDIS_TARGET = "invoisx-proxy-redis"
CONCURRENCIES = (1, 32, 256)
BENCH_DIR = Path(__file__).resolve().parent
MITM_VENV = BENCH_DIR / ".venv-mitm"
_MIB = 1024 * 1024
_FIRST_REQUESTS = 1000
_MEMORY_CONCURRENCY = 32


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- options and prerequisites -------------------------------------------------------------


def _targets(value: str) -> tuple[str, ...]:
    chosen = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = sorted(set(chosen) - set(TARGETS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {','.join(TARGETS)}; got {value!r}")
    return tuple(name for name in TARGETS if name in chosen)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run (3)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (10)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per target (2)")
    parser.add_argument("--only", type=_targets, default=TARGETS, help=",".join(TARGETS))
    parser.add_argument("--skip-streaming", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path, help="write all figures to this file")
    parser.add_argument(
        "--proxy-cmd",
        default=default_proxy_cmd(),
        help="command starting the proxy; '--host 127.0.0.1 --port P' is appended "
        "(default: %(default)s)",
    )
    parser.add_argument("--stream-mb", type=int, default=256, help="MiB each way (256)")
    parser.add_argument("--memory-requests", type=int, default=50_000, help="(50000)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--setup", action="store_true", help="install mitmproxy and exit")
    args = parser.parse_args(argv)
    if min(args.duration, args.rounds, args.warmup + 1, args.stream_mb) < 1:
        parser.error("--duration, --rounds and --stream-mb must be positive")
    if args.memory_requests <= _FIRST_REQUESTS:
        parser.error(f"--memory-requests must exceed {_FIRST_REQUESTS}")
    return args


def find_mitmdump() -> str | None:
    local = MITM_VENV / "bin" / "mitmdump"
    return str(local) if local.exists() else shutil.which("mitmdump")


def setup_mitm() -> int:
    """Create bench/.venv-mitm and install mitmproxy into it."""
    if not (MITM_VENV / "bin" / "python").exists():
        log(f"creating {MITM_VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(MITM_VENV)], check=True)
    log("installing mitmproxy")
    pip = [str(MITM_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "mitmproxy"]
    subprocess.run(pip, check=True)
    log(f"mitmdump: {find_mitmdump()}")
    return 0


def _proxy_command_found(proxy_cmd: str) -> bool:
    if proxy_cmd != default_proxy_cmd() or "-m proxy" not in proxy_cmd:
        return True
    probe = [sys.executable, "-c", "import proxy.cli"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def missing_prerequisites(args: argparse.Namespace) -> str | None:
    """One line naming what is missing and how to install it, or None."""
    hints = []
    apt = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if not args.no_pin and shutil.which("taskset") is None:
        apt.append("util-linux")
    if apt:
        hints.append(f"{', '.join(apt)} (apt-get install {' '.join(apt)})")
    if "mitmproxy" in args.only and find_mitmdump() is None:
        hints.append("mitmdump (python bench/run.py --setup)")
    if REDIS_TARGET in args.only and shutil.which("redis-server") is None:
        hints.append("redis-server (apt-get install redis-server)")
    invoisx = any(name in args.only for name in INVOISX_TARGETS)
    if invoisx and not _proxy_command_found(args.proxy_cmd):
        hints.append(f"invoisx-proxy ({sys.executable} -m pip install -e .)")
    return f"missing prerequisites: {'; '.join(hints)}" if hints else None


# --- CPU placement -------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """The driver (this script, wrk, upstreams) and the server under test on separate CPUs."""

    driver: int | None
    server: int | None

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


def pin(no_pin: bool) -> Placement:
    cpus = sorted(os.sched_getaffinity(0))
    if no_pin or len(cpus) < 2:
        return Placement(None, None)
    os.sched_setaffinity(0, {cpus[0]})
    return Placement(driver=cpus[0], server=cpus[1])


# --- one run's state -----------------------------------------------------------------------


@dataclass
class Bench:
    """Everything one benchmark run starts and measures."""

    args: argparse.Namespace
    workdir: Path
    stack: contextlib.ExitStack
    placement: Placement
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    upstream_port: int = 0
    services: dict[str, Service] = field(default_factory=dict)
    figures: dict[str, object] = field(default_factory=dict)
    error_runs: list[str] = field(default_factory=list)

    def own(self, service: Service) -> Service:
        self.stack.callback(service.stop)
        self.services[service.name] = service
        return service

    def invoisx(
        self,
        name: str,
        api_url: str,
        probe_path: str | None = BUYERS_PATH,
        extra_env: dict[str, str] | None = None,
    ) -> Service:
        port = free_port()
        service = start_invoisx(
            self.args.proxy_cmd,
            name=name,
            workdir=self.workdir,
            port=port,
            api_url=api_url,
            token=self.token,
            cpu=self.placement.server,
            probe_path=probe_path,
            extra_env=extra_env,
        )
        service.extra["port"] = str(port)
        return self.own(service)

    def note_errors(self, label: str, errors: int) -> None:
        if errors:
            self.error_runs.append(f"{label}: {errors} errors")


# --- load ----------------------------------------------------------------------------------


def start_targets(bench: Bench) -> list[Target]:
    args, token, up = bench.args, bench.token, bench.upstream_port
    cpu, workdir = bench.placement.server, bench.workdir
    targets = []
    for name in args.only:
        if name == "direct":
            targets.append(Target(name, up, (("Authorization", f"Bearer {token}"),)))
            continue
        port = free_port()
        if name == "nginx-proxy":
            bench.own(start_nginx_proxy(workdir, port, up, token, cpu))
        elif name == "mitmproxy":
            mitmdump = find_mitmdump() or "mitmdump"
            bench.own(start_mitmdump(mitmdump, workdir, port, up, token, cpu))
        else:
            env = redis_env(bench) if name == REDIS_TARGET else None
            api_url = f"http://127.0.0.1:{up}/api/v1"
            port = int(bench.invoisx(name, api_url, extra_env=env).extra["port"])
        targets.append(Target(name, port))
        log(f"started {name} on :{port}")
    return targets


def redis_env(bench: Bench) -> dict[str, str]:
    """A redis-server for the Redis target (free port, in the run's directory, on the driver's
    CPU: in production Redis has its own machine, so its work is not charged to the proxy's
    core) and the setting that points the proxy at it."""
    port = free_port()
    bench.own(start_redis(bench.workdir, port, cpu=bench.placement.driver))
    log(f"redis-server on :{port}")
    return {"INVOISX_PROXY_REDIS_URL": f"redis://127.0.0.1:{port}/0"}


def _wrk(bench: Bench, target: Target, conns: int, seconds: int, label: str) -> WrkResult | None:
    if bench.placement.server is not None:
        wait_idle(bench.placement.server)
    try:
        result = run_wrk(target.url, conns, seconds, target.headers)
    except (WrkError, subprocess.TimeoutExpired) as exc:
        bench.error_runs.append(f"{label}: wrk failed: {exc}")
        log(f"{label}: wrk failed: {exc}")
        return None
    bench.note_errors(label, result.errors)
    errors = f"socket {result.socket_errors}, status {result.status_errors}"
    log(
        f"{label:<32} {result.rps:>9.0f} req/s  p50 {result.p50_ms:.3f} ms  "
        f"p99 {result.p99_ms:.3f} ms  errors {result.errors} ({errors})"
    )
    return result


def schedule(targets: Sequence[Target], round_no: int) -> list[tuple[Target, int]]:
    """The runs of one round: each target's concurrencies back to back, so comparing a target
    with itself at another concurrency is not disturbed by other servers' runs in between.

    Rounds rotate which target goes first and alternate the order of the concurrencies, so no
    run always follows the same one.
    """
    start = (round_no - 1) % len(targets)
    order = [*targets[start:], *targets[:start]]
    concurrencies = CONCURRENCIES if round_no % 2 else CONCURRENCIES[::-1]
    return [(target, conns) for target in order for conns in concurrencies]


def run_load(bench: Bench, targets: Sequence[Target]) -> dict[tuple[str, int], list[WrkResult]]:
    """Warm up each target, then the rounds (see `schedule`)."""
    args = bench.args
    warmups = []
    for target in targets if args.warmup else ():
        result = _wrk(bench, target, 32, args.warmup, f"warm-up {target.name}")
        if result is not None:
            warmups.append({"target": target.name, "connections": 32} | result.as_dict())
    bench.figures["warmups"] = warmups
    runs: dict[tuple[str, int], list[WrkResult]] = {}
    records = []
    for round_no in range(1, args.rounds + 1):
        for target, conns in schedule(targets, round_no):
            label = f"round {round_no} c={conns} {target.name}"
            result = _wrk(bench, target, conns, args.duration, label)
            if result is not None:
                runs.setdefault((target.name, conns), []).append(result)
                records.append(
                    {"round": round_no, "target": target.name, "connections": conns}
                    | result.as_dict()
                )
    bench.figures["runs"] = records
    return runs


# --- memory and streaming ------------------------------------------------------------------


def measure_memory(bench: Bench) -> dict[str, float | int]:
    """RSS of a fresh proxy: at start-up, after 1,000 requests, after --memory-requests more."""
    service = bench.invoisx("invoisx-memory", f"http://127.0.0.1:{bench.upstream_port}/api/v1")
    port, pids = int(service.extra["port"]), process_tree(service.pid)
    startup = rss_mb(pids)
    first = drive(port, BUYERS_PATH, _FIRST_REQUESTS, _MEMORY_CONCURRENCY)
    after_first = rss_mb(pids)
    rest = drive(port, BUYERS_PATH, bench.args.memory_requests, _MEMORY_CONCURRENCY)
    time.sleep(0.5)
    after_all = rss_mb(pids)
    service.stop()
    for label, load in (("memory first", first), ("memory rest", rest)):
        bench.note_errors(label, load.errors)
    result = {
        "rss_startup_mb": startup,
        "requests_first": first.requests,
        "rss_after_first_mb": after_first,
        "requests_total": first.requests + rest.requests,
        "rss_after_total_mb": after_all,
        "errors": first.errors + rest.errors,
        "req_per_s": _rate(rest),
    }
    log(
        f"memory: start-up {startup:.1f} MB, after {first.requests} {after_first:.1f} MB, "
        f"after {result['requests_total']} {after_all:.1f} MB ({_rate(rest):.0f} req/s)"
    )
    return result


def _rate(load: CountedLoad) -> float:
    return load.requests / load.seconds if load.seconds else 0.0


def _transfer(bench: Bench, direction: str, port: int, size: int, pids: Sequence[int]) -> Transfer:
    move = download if direction == "download" else upload
    try:
        result = move(port, size, pids)
    except (OSError, http.client.HTTPException) as exc:
        result = Transfer(direction, 0, 0.0, False, f"{type(exc).__name__}: {exc}", 0, 0, 0)
    log(
        f"{direction}: {result.bytes / _MIB:.0f} MB in {result.seconds:.2f} s "
        f"({result.mb_per_s:.0f} MB/s), sha256 {'ok' if result.sha256_ok else 'MISMATCH'}, "
        f"RSS {result.rss_baseline_mb:.1f} -> peak {result.rss_peak_mb:.1f} MB; {result.detail}"
    )
    return result


def measure_streaming(bench: Bench) -> dict[str, Transfer]:
    """--stream-mb down and up through a fresh proxy in front of the stdlib blob upstream."""
    up_port = free_port()
    bench.own(start_streaming_upstream(bench.workdir, up_port, bench.token))
    size = bench.args.stream_mb * _MIB
    service = bench.invoisx(
        "invoisx-streaming",
        f"http://127.0.0.1:{up_port}/api/v1",
        probe_path=None,
        # The proxy caps request bodies (10 MiB by default); lift the cap for this upload only.
        extra_env={"INVOISX_PROXY_MAX_BODY_BYTES": str(size)},
    )
    port, pids = int(service.extra["port"]), process_tree(service.pid)
    results = {d: _transfer(bench, d, port, size, pids) for d in ("download", "upload")}
    service.stop()
    return results


# --- checks and output ---------------------------------------------------------------------


def redis_ratios(summary: dict[tuple[str, int], Summary]) -> dict[str, float | None]:
    """The Redis target against the in-memory proxy (c=32 req/s) and direct (c=1 p50)."""
    redis32, memory32 = summary.get((REDIS_TARGET, 32)), summary.get(("invoisx-proxy", 32))
    redis1, direct1 = summary.get((REDIS_TARGET, 1)), summary.get(("direct", 1))
    return {
        "c32_redis_over_invoisx": (
            redis32.rps / memory32.rps if redis32 and memory32 and memory32.rps else None
        ),
        "c1_redis_added_p50_ms": redis1.p50_ms - direct1.p50_ms if redis1 and direct1 else None,
    }


def build_checks(
    bench: Bench,
    ratio: dict[str, float | None],
    memory: dict[str, float | int] | None,
    streams: dict[str, Transfer] | None,
) -> list[Check]:
    mem = memory or {}
    after_first, after_all = mem.get("rss_after_first_mb"), mem.get("rss_after_total_mb")
    drift = None if after_all is None or after_first is None else abs(after_all - after_first)
    total = mem.get("requests_total", bench.args.memory_requests + _FIRST_REQUESTS)
    checks = [
        check(
            "c=32 req/s invoisx / nginx-proxy", ratio["c32_invoisx_over_nginx_proxy"], at_least=0.07
        ),
        check("c=32 req/s invoisx / mitmproxy", ratio["c32_invoisx_over_mitmproxy"], at_least=4.0),
        check("c=1 added p50 over direct (ms)", ratio["c1_added_p50_ms"], at_most=0.4),
        check("invoisx req/s c=256 / c=32", ratio["invoisx_c256_over_c32"], at_least=0.9),
        check("c=32 req/s invoisx-redis / invoisx", ratio["c32_redis_over_invoisx"], at_least=0.6),
        check("c=1 added p50, invoisx-redis (ms)", ratio["c1_redis_added_p50_ms"], at_most=0.5),
        check(f"RSS after {total} requests (MB)", after_all, at_most=64),
        check(f"RSS drift {_FIRST_REQUESTS} -> {total} requests (MB)", drift, at_most=5),
    ]
    for direction in ("download", "upload"):
        moved = (streams or {}).get(direction)
        intact = None if moved is None else float(moved.sha256_ok)
        growth = moved.rss_growth_mb if moved is not None and moved.sha256_ok else None
        checks.append(check(f"{direction} sha256 intact (1 = yes)", intact, at_least=1))
        checks.append(check(f"RSS growth during {direction} (MB)", growth, at_most=16))
    checks.append(check("runs with errors", float(len(bench.error_runs)), at_most=0))
    return checks


def _versions(mitm: bool) -> dict[str, str]:
    commands = {"nginx": ["nginx", "-v"], "wrk": ["wrk", "-v"]}
    if mitm and (mitmdump := find_mitmdump()):
        commands["mitmdump"] = [mitmdump, "--version"]
    versions = {}
    for name, argv in commands.items():
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        versions[name] = ((done.stdout or done.stderr).strip().splitlines() or [""])[0]
    versions["python"] = sys.version.split()[0]
    return versions


def run(bench: Bench) -> list[Check]:
    args = bench.args
    bench.upstream_port = free_port()
    upstream = start_nginx_upstream(bench.workdir, bench.upstream_port, bench.token, None)
    bench.own(upstream)
    log(f"nginx upstream on :{bench.upstream_port}")
    targets = start_targets(bench)
    summary = summarise(run_load(bench, targets))
    for name in [target.name for target in targets] + ["redis"]:
        if name in bench.services:
            bench.services[name].stop()
    invoisx = "invoisx-proxy" in args.only
    memory = measure_memory(bench) if invoisx and not args.skip_memory else None
    streams = measure_streaming(bench) if invoisx and not args.skip_streaming else None
    ratio = ratios(summary) | redis_ratios(summary)
    checks = build_checks(bench, ratio, memory, streams)

    print(format_table(summary, args.only, CONCURRENCIES))
    print()
    for name, value in ratio.items():
        print(f"{name:<30} {'-' if value is None else f'{value:.3f}'}")
    if memory:
        print(
            f"{'RSS start-up / after 1k / after ' + str(memory['requests_total']):<30} "
            f"{memory['rss_startup_mb']:.1f} / {memory['rss_after_first_mb']:.1f} / "
            f"{memory['rss_after_total_mb']:.1f} MB"
        )
    for moved in (streams or {}).values():
        print(
            f"{moved.direction + ' ' + str(args.stream_mb) + ' MB':<30} "
            f"{moved.mb_per_s:.0f} MB/s, RSS {moved.rss_baseline_mb:.1f} -> peak "
            f"{moved.rss_peak_mb:.1f} MB (+{moved.rss_growth_mb:.1f}), "
            f"sha256 {'ok' if moved.sha256_ok else 'MISMATCH'}"
        )
    for line in bench.error_runs:
        print(f"errors: {line}")
    print()
    print(format_checks(checks))
    bench.figures |= {
        "summary": [{"target": t, "connections": c} | asdict(s) for (t, c), s in summary.items()],
        "ratios": ratio,
        "memory": memory,
        "streaming": {d: t.as_dict() for d, t in (streams or {}).items()} or None,
        "error_runs": bench.error_runs,
        "checks": [asdict(c) for c in checks],
    }
    return checks


def _sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(143)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.setup:
        return setup_mitm()
    if problem := missing_prerequisites(args):
        print(problem, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    placement = pin(args.no_pin)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="invoisx-bench-", ignore_cleanup_errors=True) as tmp,
        contextlib.ExitStack() as stack,
    ):
        bench = Bench(args, Path(tmp), stack, placement)
        bench.figures["config"] = {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
        } | {"placement": placement.as_dict(), "versions": _versions("mitmproxy" in args.only)}
        try:
            checks = run(bench)
        except ReadinessError as exc:
            log(f"error: {exc}")
            return 1
        finally:
            bench.figures["seconds"] = round(time.monotonic() - started, 1)
            if args.json:
                args.json.write_text(json.dumps(bench.figures, indent=2, default=str) + "\n")
    log(f"finished in {time.monotonic() - started:.0f} s")
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        sys.exit(130)
