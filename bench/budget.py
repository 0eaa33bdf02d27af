"""Shared rate-limit budget: a batch job and an interactive app behind proxies sharing one token.

Usage: python bench/budget.py [--mode memory|redis|both] [--duration 130] [--outage] [--json F]

It starts the embedded InvoisX sandbox (`invoisx-proxy sandbox`, a fixed window of --limit,
60, calls a minute per token, windows aligned to the wall-clock minute) and real proxy
processes (`invoisx-proxy serve`) holding its read-only token, with
INVOISX_RATE_LIMIT_PER_MINUTE at the same limit and a config file with two client keys:
`batch` and `interactive` (`reserved_per_minute = --reserve`, 12; 0 leaves it out). Then,
for --duration seconds:

- a batch job: --batch-callers (4) callers per proxy, each calling `GET /api/v1/buyers` with
  the batch key as fast as it is answered; on a 429 it sleeps `Retry-After` seconds, then
  goes on;
- an interactive app: one call every --interactive-every (5) seconds, with its own key,
  through the first proxy.

Runs (--mode): `memory`, --proxies (default 1) proxies with their in-process budget; `redis`,
--proxies (default 3) proxies sharing the budget on a redis-server started for the run
(INVOISX_PROXY_REDIS_URL; free port, temporary directory, no persistence); `both` (the
default) runs the two one after the other, each against a fresh sandbox. `--outage` (redis
runs): redis-server is stopped at --outage-at (40) seconds into the load for --outage-for (20)
seconds, then started again on the same port, empty.

Measured per run, from the app's side and from the proxies' JSON lines on stdout:

- interactive: calls made and answered 2xx; latency as the app saw it and the proxy's
  `waited_ms`, p50 / p95 / max (nearest rank);
- InvoisX 429s: the sandbox's 429 answers, from the audit line's `upstream_429s` (attempts the
  proxy retried included), and the calls whose final answer was one; the attempts the proxy
  sent again for any reason (`retries`: a 429, a keep-alive race); proxy 429s
  (`decision: rate_limited`) per client;
- forwarded calls in all and per sandbox window (by when the call reached InvoisX: the audit
  line's time minus its `upstream_ms`), and what the sandbox allowed: `limit` per window.
  The first and last windows are only partly covered by the load, so two ratios are given:
  `full` counts only the windows the load covered from start to end (the fair one, checked;
  SKIP when the run covers none, as in a run shorter than two minutes may), `span` every
  window from the first forwarded call to the last, each at the full limit (a lower bound);
- with --outage: the calls forwarded during the outage (per proxy), InvoisX 429s during and
  after it, when each proxy logged `state_store_unavailable` and `state_store_recovered`,
  how often one went unavailable again after the restart, the time from the restart until
  every proxy had recovered for good (its last state change a `state_store_recovered`), and
  the time from the restart to the first window from which on every window stayed within
  the limit with no InvoisX 429 (0 when the restart's own window did).

Targets (PASS/FAIL; exit status 1 if one fails or the run broke, 2 if a prerequisite is
missing): every interactive call 2xx; interactive p95 latency <= 2 s; InvoisX 429s == 0;
served calls (forwarded, not refused by InvoisX) >= 95% of what the full windows allowed;
with --outage, every proxy recovered for good. INVOISX_* variables of the calling environment are
ignored: the script sets every setting the scenario depends on.

    .venv/bin/python bench/budget.py                       # memory, then redis: ~5 minutes
    .venv/bin/python bench/budget.py --mode redis --outage --json bench/budget-outage.json
    .venv/bin/python bench/budget.py --mode memory --duration 20 --reserve 0   # a dry run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from procs import ReadinessError, Service, free_port
from report import Check, check, format_checks
from services import BUYERS_PATH, default_proxy_cmd, start_invoisx, start_redis, start_sandbox

WINDOW = 60  # the sandbox's window, seconds, aligned to the wall-clock minute
CALL_TIMEOUT = 60.0  # the proxy holds a call up to INVOISX_RATE_LIMIT_MAX_WAIT (10 s)
DRAIN_TIMEOUT = 30.0  # after the load, calls still in flight get this long to end
PROGRESS_EVERY = 10.0
SERVED_SHARE = 0.95
INTERACTIVE_P95_S = 2.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One run: the budget's home, how many proxies, whether Redis goes away mid-load."""

    mode: str  # "memory" or "redis"
    proxies: int
    outage: bool

    @property
    def label(self) -> str:
        outage = ", Redis outage" if self.outage else ""
        return f"{self.mode}: {self.proxies} prox{'y' if self.proxies == 1 else 'ies'}{outage}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("memory", "redis", "both"), default="both")
    parser.add_argument("--proxies", type=int, help="proxies per run (memory 1, redis 3)")
    parser.add_argument("--duration", type=float, default=130, help="seconds of load (130)")
    parser.add_argument("--limit", type=int, default=60, help="calls a minute per token (60)")
    parser.add_argument("--batch-callers", type=int, default=4, help="per proxy (4)")
    parser.add_argument("--interactive-every", type=float, default=5, help="seconds (5)")
    parser.add_argument(
        "--reserve", type=int, default=12, help="interactive's reserved_per_minute, 0: none (12)"
    )
    parser.add_argument("--outage", action="store_true", help="stop Redis mid-load (redis runs)")
    parser.add_argument("--outage-at", type=float, default=40, help="seconds into the load (40)")
    parser.add_argument("--outage-for", type=float, default=20, help="seconds (20)")
    parser.add_argument("--json", type=Path, help="write all figures to this file")
    parser.add_argument("--keep-logs", type=Path, help="copy every process's output here")
    parser.add_argument(
        "--proxy-cmd",
        default=default_proxy_cmd(),
        help="command starting a proxy; '--host 127.0.0.1 --port P' is appended "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.duration < 10 or args.limit < 1 or args.batch_callers < 0:
        parser.error("--duration >= 10, --limit >= 1, --batch-callers >= 0")
    if args.interactive_every <= 0 or args.reserve < 0 or (args.proxies or 1) < 1:
        parser.error("--interactive-every > 0, --reserve >= 0, --proxies >= 1")
    if args.outage and args.mode == "memory":
        parser.error("--outage needs a redis run (--mode redis or both)")
    if args.outage and not 0 < args.outage_at < args.outage_at + args.outage_for < args.duration:
        parser.error("the outage must start after 0 s and end before --duration")
    return args


def plans(args: argparse.Namespace) -> list[Plan]:
    modes = ("memory", "redis") if args.mode == "both" else (args.mode,)
    default = {"memory": 1, "redis": 3}
    return [
        Plan(mode, args.proxies or default[mode], args.outage and mode == "redis") for mode in modes
    ]


def missing_prerequisites(chosen: Sequence[Plan]) -> str | None:
    if any(plan.mode == "redis" for plan in chosen) and shutil.which("redis-server") is None:
        return "missing prerequisite: redis-server (apt-get install redis-server)"
    return None


def drop_inherited_settings() -> list[str]:
    """Remove INVOISX_* from this process's environment (the proxies inherit it)."""
    dropped = sorted(name for name in os.environ if name.startswith("INVOISX_"))
    for name in dropped:
        del os.environ[name]
    return dropped


# --- the processes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    batch: str
    interactive: str


def new_keys() -> Keys:
    return Keys("ipk_" + secrets.token_urlsafe(32), "ipk_" + secrets.token_urlsafe(32))


def config_text(keys: Keys, reserve: int) -> str:
    """The proxies' TOML config: the two client keys, the interactive one with its reserve."""

    def table(name: str, key: str, extra: str = "") -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f'[clients.{name}]\nkey_sha256 = "{digest}"\npermissions = ["read"]\n{extra}'

    reserved = f"reserved_per_minute = {reserve}\n" if reserve else ""
    return table("batch", keys.batch) + "\n" + table("interactive", keys.interactive, reserved)


@dataclass
class Stack:
    """The processes of one run; `redis` is replaced when the outage restarts it."""

    workdir: Path
    proxies: list[Service] = field(default_factory=list)
    redis: Service | None = None
    redis_port: int = 0

    def ports(self) -> list[int]:
        return [int(proxy.extra["port"]) for proxy in self.proxies]

    def stop_redis(self) -> None:
        if self.redis is not None:
            self.redis.stop()


def start_stack(
    plan: Plan, args: argparse.Namespace, workdir: Path, keys: Keys, stack: contextlib.ExitStack
) -> Stack:
    run = Stack(workdir)
    sandbox_port = free_port()
    sandbox, tokens = start_sandbox(workdir, sandbox_port, args.limit)
    stack.callback(sandbox.stop)
    log(f"sandbox on :{sandbox_port} ({args.limit} calls a minute per token)")
    env = {
        "INVOISX_TOKEN_PERMISSIONS": "read",
        "INVOISX_RATE_LIMIT_PER_MINUTE": str(args.limit),
        "INVOISX_PROXY_CONFIG": str(workdir / "proxy.toml"),
    }
    (workdir / "proxy.toml").write_text(config_text(keys, args.reserve))
    if plan.mode == "redis":
        run.redis_port = free_port()
        run.redis = start_redis(workdir, run.redis_port)
        stack.callback(run.stop_redis)
        env["INVOISX_PROXY_REDIS_URL"] = f"redis://127.0.0.1:{run.redis_port}/0"
        log(f"redis-server on :{run.redis_port}")
    for number in range(1, plan.proxies + 1):
        port = free_port()
        proxy = start_invoisx(
            args.proxy_cmd,
            name=f"proxy{number}",
            workdir=workdir,
            port=port,
            api_url=f"http://127.0.0.1:{sandbox_port}/api/v1",
            token=tokens["read-only"],
            cpu=None,
            probe_path=None,  # a probe of /api/v1 would spend the token's limit
            extra_env=env,
        )
        stack.callback(proxy.stop)
        proxy.extra["port"] = str(port)
        run.proxies.append(proxy)
        log(f"proxy{number} on :{port}")
    return run


# --- the load ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One call as the app saw it; `status` None: no answer (refused, reset, timed out)."""

    client: str
    proxy: int
    started: float  # Unix time
    seconds: float
    status: int | None
    retry_after: float | None


@dataclass
class Outage:
    """When Redis was stopped and started again (Unix times)."""

    stopping: float = 0.0
    stopped: float = 0.0
    restarting: float = 0.0
    restarted: float = 0.0


@dataclass
class Load:
    start: float
    deadline: float
    sent: list[Sent] = field(default_factory=list)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None


async def _call(http: httpx.AsyncClient, client: str, proxy: int) -> Sent:
    started, clock = time.time(), time.perf_counter()
    try:
        response = await http.get(BUYERS_PATH)
    except httpx.HTTPError:
        return Sent(client, proxy, started, time.perf_counter() - clock, None, None)
    seconds = time.perf_counter() - clock
    return Sent(client, proxy, started, seconds, response.status_code, _retry_after(response))


def _client(port: int, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=CALL_TIMEOUT,
        trust_env=False,
    )


async def _sleep_within(load: Load, seconds: float) -> None:
    await asyncio.sleep(max(0.0, min(seconds, load.deadline - time.time())))


async def batch_caller(load: Load, proxy: int, port: int, key: str) -> None:
    """Calls back to back; after a 429 sleeps its Retry-After, after no answer 1 s."""
    async with _client(port, key) as http:
        while time.time() < load.deadline:
            sent = await _call(http, "batch", proxy)
            load.sent.append(sent)
            if sent.status == 429:
                await _sleep_within(load, 1.0 if sent.retry_after is None else sent.retry_after)
            elif sent.status is None:
                await _sleep_within(load, 1.0)


async def interactive_app(load: Load, port: int, key: str, every: float) -> None:
    """One call every `every` seconds; one that takes longer delays the next."""
    async with _client(port, key) as http:
        tick = load.start
        while tick < load.deadline:
            await asyncio.sleep(max(0.0, tick - time.time()))
            sent = await _call(http, "interactive", 1)
            load.sent.append(sent)
            status = "no answer" if sent.status is None else sent.status
            log(f"  t={sent.started - load.start:5.1f}s interactive {status} {sent.seconds:.3f} s")
            tick = max(tick + every, time.time())


async def redis_outage(run: Stack, load: Load, at: float, length: float) -> Outage:
    """Stop redis-server `at` seconds into the load, start it again `length` seconds later."""
    assert run.redis is not None
    times = Outage()
    await asyncio.sleep(max(0.0, load.start + at - time.time()))
    times.stopping = time.time()
    await asyncio.to_thread(run.redis.stop)
    times.stopped = time.time()
    log(f"  t={times.stopped - load.start:5.1f}s redis-server stopped")
    await asyncio.sleep(max(0.0, times.stopping + length - time.time()))
    times.restarting = time.time()
    run.redis = await asyncio.to_thread(start_redis, run.workdir, run.redis_port)
    times.restarted = time.time()
    log(f"  t={times.restarted - load.start:5.1f}s redis-server answering again")
    return times


async def progress(load: Load) -> None:
    while time.time() < load.deadline:
        await asyncio.sleep(PROGRESS_EVERY)
        counts = Counter(f"{s.client} {s.status or 'none'}" for s in load.sent)
        log(f"  t={time.time() - load.start:5.1f}s " + ", ".join(sorted_counts(counts)))


def sorted_counts(counts: Counter[str]) -> list[str]:
    return [f"{name}: {count}" for name, count in sorted(counts.items())]


async def drive(
    plan: Plan, args: argparse.Namespace, run: Stack, keys: Keys
) -> tuple[Load, Outage | None]:
    """The load for --duration seconds, then the calls in flight (up to DRAIN_TIMEOUT)."""
    start = time.time()
    load = Load(start=start, deadline=start + args.duration)
    ports = run.ports()
    callers = [
        batch_caller(load, proxy, port, keys.batch)
        for proxy, port in enumerate(ports, 1)
        for _ in range(args.batch_callers)
    ]
    tasks = [asyncio.create_task(c) for c in callers]
    tasks.append(
        asyncio.create_task(
            interactive_app(load, ports[0], keys.interactive, args.interactive_every)
        )
    )
    watcher = asyncio.create_task(progress(load))
    outage = None
    if plan.outage:
        outage = await redis_outage(run, load, args.outage_at, args.outage_for)
    await asyncio.sleep(max(0.0, load.deadline - time.time()))
    watcher.cancel()
    done, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, watcher, return_exceptions=True)
    for task in done:
        task.result()  # a bug in a caller should not pass silently
    return load, outage


# --- the proxies' lines --------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """The audit line of one API call; `reached` ~ when its last attempt reached InvoisX."""

    proxy: int
    client: str
    status: int
    decision: str
    error_code: str | None
    waited_ms: float
    retries: int
    throttled: int  # the sandbox's 429 answers to this call
    ended: float
    reached: float

    @property
    def forwarded(self) -> bool:
        return self.decision == "forwarded"

    @property
    def refused_by_invoisx(self) -> bool:
        return self.forwarded and self.status == 429


@dataclass(frozen=True)
class Event:
    proxy: int
    event: str
    at: float
    fields: dict[str, Any]


def _unix(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def read_proxy_output(path: Path, proxy: int) -> tuple[list[Line], list[Event]]:
    """Audit lines of API calls and every other event line from one proxy's stdout."""
    lines, events = [], []
    for text in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(text)
            at = _unix(record["timestamp"])
        except (ValueError, KeyError, TypeError):
            continue
        if record.get("event") != "request":
            events.append(Event(proxy, str(record.get("event")), at, record))
            continue
        if not str(record.get("path", "")).startswith("/api/"):
            continue
        upstream_ms = record.get("upstream_ms") or 0.0
        lines.append(
            Line(
                proxy=proxy,
                client=str(record.get("client")),
                status=int(record.get("status") or 0),
                decision=str(record.get("decision")),
                error_code=record.get("error_code"),
                waited_ms=float(record.get("waited_ms") or 0.0),
                retries=int(record.get("retries") or 0),
                throttled=int(record.get("upstream_429s") or 0),
                ended=at,
                reached=at - upstream_ms / 1000,
            )
        )
    return lines, events


# --- figures -------------------------------------------------------------------------------


def percentile(values: Iterable[float], share: float) -> float | None:
    """Nearest-rank percentile (`share` 0.95: the smallest value >= 95% of them)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def spread(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "max": max(values, default=None),
    }


def interactive_figures(sent: Sequence[Sent], lines: Sequence[Line]) -> dict[str, Any]:
    calls = [s for s in sent if s.client == "interactive"]
    audited = [line for line in lines if line.client == "interactive"]
    return {
        "calls": len(calls),
        "answered_2xx": sum(1 for s in calls if s.status is not None and 200 <= s.status < 300),
        "statuses": dict(Counter(str(s.status) for s in calls)),
        "latency_s": spread([s.seconds for s in calls]),
        "proxy_waited_s": spread([line.waited_ms / 1000 for line in audited]),
        "decisions": dict(Counter(line.decision for line in audited)),
    }


def call_figures(sent: Sequence[Sent], lines: Sequence[Line]) -> dict[str, Any]:
    forwarded = [line for line in lines if line.forwarded]
    clients = sorted({line.client for line in lines} | {s.client for s in sent})
    return {
        "app_calls": dict(Counter(s.client for s in sent)),
        "app_statuses": {
            client: dict(Counter(str(s.status) for s in sent if s.client == client))
            for client in clients
        },
        "no_answer": sum(1 for s in sent if s.status is None),
        "audit_lines": len(lines),
        "decisions": {
            client: dict(Counter(line.decision for line in lines if line.client == client))
            for client in clients
        },
        "proxy_429": {
            client: sum(1 for x in lines if x.client == client and x.decision == "rate_limited")
            for client in clients
        },
        "forwarded": len(forwarded),
        "forwarded_per_proxy": dict(Counter(str(line.proxy) for line in forwarded)),
        "served": sum(1 for line in forwarded if not line.refused_by_invoisx),
        "invoisx_429_final": sum(1 for line in forwarded if line.refused_by_invoisx),
        "invoisx_429_answers": sum(line.throttled for line in forwarded),
        "retried_attempts": sum(line.retries for line in forwarded),
    }


def _window(at: float) -> int:
    return int(at // WINDOW)


def _iso(window: int) -> str:
    return datetime.fromtimestamp(window * WINDOW, UTC).strftime("%H:%M")


def window_rows(
    lines: Sequence[Line], limit: int, load: Load, outage: Outage | None
) -> list[dict[str, Any]]:
    """Per sandbox window from the first forwarded call to the last: counts and coverage."""
    forwarded = [line for line in lines if line.forwarded]
    if not forwarded:
        return []
    first = _window(min(line.reached for line in forwarded))
    last = _window(max(line.reached for line in forwarded))
    rows = []
    for window in range(first, last + 1):
        begins, ends = window * WINDOW, (window + 1) * WINDOW
        inside = [line for line in forwarded if _window(line.reached) == window]
        covered = begins >= load.start and ends <= load.deadline
        rows.append(
            {
                "window": window,
                "utc": _iso(window),
                "covered": "full" if covered else "partial",
                "outage": outage is not None
                and begins < outage.restarted
                and ends > outage.stopping,
                "allowed": limit,
                "forwarded": len(inside),
                "served": sum(1 for line in inside if not line.refused_by_invoisx),
                "invoisx_429": sum(line.throttled for line in inside),
                "retried": sum(line.retries for line in inside),
                "per_proxy": dict(Counter(str(line.proxy) for line in inside)),
                "per_client": dict(Counter(line.client for line in inside)),
            }
        )
    return rows


def allowed_figures(rows: Sequence[dict[str, Any]], limit: int) -> dict[str, Any]:
    """Served calls against the sandbox's allowance: full windows only, and the whole span."""
    full = [row for row in rows if row["covered"] == "full"]
    served_full = sum(row["served"] for row in full)
    served_all = sum(row["served"] for row in rows)
    return {
        "full_windows": len(full),
        "full_allowed": len(full) * limit,
        "full_served": served_full,
        "full_ratio": served_full / (len(full) * limit) if full else None,
        "span_windows": len(rows),
        "span_allowed": len(rows) * limit,
        "span_served": served_all,
        "span_ratio": served_all / (len(rows) * limit) if rows else None,
    }


_UNAVAILABLE, _RECOVERED = "state_store_unavailable", "state_store_recovered"


def _store_events(events: Sequence[Event], proxy: int, after: float) -> list[Event]:
    """One proxy's state-store changes at or after `after`, in order."""
    chosen = (_UNAVAILABLE, _RECOVERED)
    return sorted(
        (e for e in events if e.proxy == proxy and e.event in chosen and e.at >= after),
        key=lambda e: e.at,
    )


def _since(at: float | None, origin: float) -> float | None:
    return None if at is None else round(at - origin, 3)


def _settled(changes: Sequence[Event]) -> float | None:
    """When the proxy last recovered, if it stayed recovered to the end; else None."""
    return changes[-1].at if changes and changes[-1].event == _RECOVERED else None


def outage_figures(
    outage: Outage,
    lines: Sequence[Line],
    events: Sequence[Event],
    rows: Sequence[dict[str, Any]],
    proxies: int,
    limit: int,
    load: Load,
) -> dict[str, Any]:
    """What the proxies admitted without Redis, and how long they took to share it again."""
    forwarded = [line for line in lines if line.forwarded]
    during = [x for x in forwarded if outage.stopping <= x.reached < outage.restarting]
    after = [x for x in forwarded if x.reached >= outage.restarting]
    detected: dict[str, float | None] = {}
    recovered: dict[str, float | None] = {}
    settled: dict[str, float | None] = {}
    relapses: dict[str, int] = {}
    for proxy in range(1, proxies + 1):
        down = _store_events(events, proxy, outage.stopping)
        back = _store_events(events, proxy, outage.restarting)
        lost = next((e.at for e in down if e.event == _UNAVAILABLE), None)
        first = next((e.at for e in back if e.event == _RECOVERED), None)
        detected[str(proxy)] = _since(lost, outage.stopping)
        recovered[str(proxy)] = _since(first, outage.restarting)
        settled[str(proxy)] = _since(_settled(back), outage.restarting)
        relapses[str(proxy)] = sum(1 for e in back if e.event == _UNAVAILABLE)
    late = [x.reached for x in after if x.throttled]
    return {
        "stopped_at_s": round(outage.stopping - load.start, 3),
        "down_s": round(outage.restarted - outage.stopping, 3),
        "restarted_at_s": round(outage.restarting - load.start, 3),
        "forwarded_during": len(during),
        "forwarded_during_per_proxy": dict(Counter(str(x.proxy) for x in during)),
        "invoisx_429_during": sum(x.throttled for x in during),
        "retried_during": sum(x.retries for x in during),
        "invoisx_429_after": sum(x.throttled for x in after),
        "retried_after": sum(x.retries for x in after),
        "unavailable_logged_after_s": detected,
        "recovered_logged_after_s": recovered,
        "unavailable_again_after_restart": relapses,
        "last_recovered_after_s": settled,
        "proxies_recovered": sum(1 for value in settled.values() if value is not None),
        "all_recovered_after_s": _all_recovered(settled),
        "last_invoisx_429_after_restart_s": (
            round(max(late) - outage.restarting, 3) if late else None
        ),
        "budget_followed_after_s": _budget_followed(rows, outage, limit),
        "events": [
            {"proxy": e.proxy, "event": e.event, "at_s": round(e.at - load.start, 3)}
            | {k: v for k, v in e.fields.items() if k not in ("timestamp", "event")}
            for e in events
            if e.event in (_UNAVAILABLE, _RECOVERED)
        ],
    }


def _all_recovered(recovered: dict[str, float | None]) -> float | None:
    """Seconds until the last proxy recovered, None if one never did."""
    times = [value for value in recovered.values() if value is not None]
    return max(times) if times and len(times) == len(recovered) else None


def _budget_followed(rows: Sequence[dict[str, Any]], outage: Outage, limit: int) -> float | None:
    """Seconds from the restart to the start of the first window from which on every window
    kept within the limit with no InvoisX 429 (0 when the restart's own window did)."""
    restart_window = _window(outage.restarting)
    later = [row for row in rows if row["window"] >= restart_window]
    ok_from: int | None = None
    for row in reversed(later):
        if row["forwarded"] > limit or row["invoisx_429"]:
            break
        ok_from = int(row["window"])
    if ok_from is None:
        return None
    return round(max(0.0, ok_from * WINDOW - outage.restarting), 3)


def build_checks(figures: dict[str, Any], plan: Plan) -> list[Check]:
    interactive, calls = figures["interactive"], figures["calls"]
    checks = [
        check(
            "interactive calls not answered 2xx",
            float(interactive["calls"] - interactive["answered_2xx"]),
            at_most=0,
        ),
        check(
            "interactive latency p95 (s)",
            interactive["latency_s"]["p95"],
            at_most=INTERACTIVE_P95_S,
        ),
        check("InvoisX 429 answers", float(calls["invoisx_429_answers"]), at_most=0),
        check(
            "served / allowed in full windows",
            figures["allowed"]["full_ratio"],
            at_least=SERVED_SHARE,
        ),
    ]
    if plan.outage:
        recovered = figures["outage"]["proxies_recovered"]
        checks.append(
            check("proxies recovered for good after restart", recovered, at_least=plan.proxies)
        )
    return checks


# --- output --------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_run(plan: Plan, figures: dict[str, Any]) -> str:
    interactive, calls, allowed = figures["interactive"], figures["calls"], figures["allowed"]
    latency, waited = interactive["latency_s"], interactive["proxy_waited_s"]
    lines = [
        f"== {plan.label}; {figures['load_s']:.0f} s of load ==",
        f"interactive   {interactive['calls']} calls, {interactive['answered_2xx']} answered 2xx "
        f"({interactive['statuses']})",
        f"  latency s   p50 {_seconds(latency['p50'])}  p95 {_seconds(latency['p95'])}  "
        f"max {_seconds(latency['max'])}",
        f"  waited s    p50 {_seconds(waited['p50'])}  p95 {_seconds(waited['p95'])}  "
        f"max {_seconds(waited['max'])}  (proxy's waited_ms)",
        f"app calls     {calls['app_calls']}, no answer {calls['no_answer']}",
        f"proxy 429s    {calls['proxy_429']}",
        f"InvoisX 429s  {calls['invoisx_429_answers']} answers, {calls['invoisx_429_final']} "
        f"final; {calls['retried_attempts']} attempts sent again by the proxy",
        f"forwarded     {calls['forwarded']} ({calls['served']} served), per proxy "
        f"{calls['forwarded_per_proxy']}",
        f"  {'window':<7}{'covered':<9}{'fwd':>5}{'served':>8}{'429':>5}{'retried':>8}"
        f"  per proxy / per client",
    ]
    for row in figures["windows"]:
        note = "  outage" if row["outage"] else ""
        lines.append(
            f"  {row['utc']:<7}{row['covered']:<9}{row['forwarded']:>5}{row['served']:>8}"
            f"{row['invoisx_429']:>5}{row['retried']:>8}  {row['per_proxy']} "
            f"{row['per_client']}{note}"
        )
    lines.append(
        f"allowed       full windows {allowed['full_windows']} x limit = "
        f"{allowed['full_allowed']}, served {allowed['full_served']} "
        f"({_ratio(allowed['full_ratio'])}); span {allowed['span_windows']} windows = "
        f"{allowed['span_allowed']}, served {allowed['span_served']} "
        f"({_ratio(allowed['span_ratio'])})"
    )
    if figures.get("outage"):
        out = figures["outage"]
        lines += [
            f"outage        stopped at {out['stopped_at_s']:.1f} s, down {out['down_s']:.1f} s; "
            f"forwarded during {out['forwarded_during']} {out['forwarded_during_per_proxy']}",
            f"  InvoisX 429 answers during {out['invoisx_429_during']}, after "
            f"{out['invoisx_429_after']}; attempts sent again during {out['retried_during']}, "
            f"after {out['retried_after']}",
            f"  unavailable logged after (s) {out['unavailable_logged_after_s']}",
            f"  recovered logged after restart (s) {out['recovered_logged_after_s']}; "
            f"unavailable again {out['unavailable_again_after_restart']}; recovered for good "
            f"after (s) {out['last_recovered_after_s']}; all: "
            f"{_seconds(out['all_recovered_after_s'])}",
            f"  within the budget again from (s after restart): "
            f"{_seconds(out['budget_followed_after_s'])}; last InvoisX 429 after restart: "
            f"{_seconds(out['last_invoisx_429_after_restart_s'])}",
        ]
    for warning in figures["warnings"]:
        lines.append(f"WARNING       {warning}")
    return "\n".join(lines)


def _warnings(plan: Plan, events: Sequence[Event]) -> list[str]:
    """Settings a proxy ignored: a run without a shared budget must not pass for one."""
    unknown = sorted(
        {
            str(e.fields.get("variable"))
            for e in events
            if e.event == "unknown_setting" and str(e.fields.get("variable")).startswith("INVOISX")
        }
    )
    warnings = [f"the proxy ignored {name} (unknown setting)" for name in unknown]
    # The startup line names the budget's home: "redis", or null for the in-process one.
    homes = {e.proxy: e.fields.get("state_store") for e in events if e.event == "startup"}
    expected = "redis" if plan.mode == "redis" else None
    warnings += [
        f"proxy{proxy} started with state_store {home!r}, not {expected!r}"
        for proxy, home in sorted(homes.items())
        if home != expected
    ]
    return warnings


# --- a run ---------------------------------------------------------------------------------


def run_plan(plan: Plan, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    keys = new_keys()
    log(f"--- {plan.label}: {args.duration:.0f} s of load")
    with contextlib.ExitStack() as stack:
        run = start_stack(plan, args, workdir, keys, stack)
        try:
            load, outage = asyncio.run(drive(plan, args, run, keys))
        finally:
            for proxy in run.proxies:
                proxy.stop()  # SIGTERM: every pending line is written before it exits
    lines: list[Line] = []
    events: list[Event] = []
    for number, proxy in enumerate(run.proxies, 1):
        found, seen = read_proxy_output(workdir / f"{proxy.name}.stdout.log", number)
        lines += found
        events += seen
    rows = window_rows(lines, args.limit, load, outage)
    figures: dict[str, Any] = {
        "plan": asdict(plan),
        "load_s": load.deadline - load.start,
        "load_start_unix": load.start,
        "interactive": interactive_figures(load.sent, lines),
        "calls": call_figures(load.sent, lines),
        "windows": rows,
        "allowed": allowed_figures(rows, args.limit),
        "warnings": _warnings(plan, events),
    }
    if outage is not None:
        figures["outage"] = outage_figures(
            outage, lines, events, rows, plan.proxies, args.limit, load
        )
    figures["checks"] = [asdict(c) for c in build_checks(figures, plan)]
    return figures


def _sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(143)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = plans(args)
    if problem := missing_prerequisites(chosen):
        log(problem)
        return 2
    if dropped := drop_inherited_settings():
        log(f"ignoring from the environment: {', '.join(dropped)}")
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.monotonic()
    results: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": [],
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="invoisx-budget-", ignore_cleanup_errors=True) as tmp:
        try:
            for number, plan in enumerate(chosen, 1):
                workdir = Path(tmp) / f"{number}-{plan.mode}"
                workdir.mkdir()
                try:
                    figures = run_plan(plan, args, workdir)
                finally:
                    if args.keep_logs:
                        shutil.copytree(workdir, args.keep_logs / workdir.name, dirs_exist_ok=True)
                results["runs"].append(figures)
                checks = [Check(**c) for c in figures["checks"]]
                failed |= any(c.status == "FAIL" for c in checks)
                print(format_run(plan, figures))
                print(format_checks(checks))
                print(flush=True)
        except ReadinessError as exc:
            log(f"error: {exc}")
            return 1
        finally:
            results["seconds"] = round(time.monotonic() - started, 1)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"finished in {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        sys.exit(130)
