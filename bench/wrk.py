"""Run wrk and parse its `--latency` report."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["WrkError", "WrkResult", "parse_wrk", "run_wrk"]

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_PERCENTILE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


class WrkError(RuntimeError):
    """wrk failed or printed something this parser does not understand."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run; `errors` counts socket errors and non-2xx/3xx responses."""

    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    socket_errors: int
    status_errors: int

    @property
    def errors(self) -> int:
        return self.socket_errors + self.status_errors

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "errors": self.errors}


def _match(pattern: re.Pattern[str], text: str, what: str) -> re.Match[str]:
    match = pattern.search(text)
    if match is None:
        raise WrkError(f"no {what} in wrk output:\n{text}")
    return match


def parse_wrk(text: str) -> WrkResult:
    """Figures from wrk's report (run with --latency)."""
    percentiles = {
        int(level): float(value) * _UNIT_MS[unit]
        for level, value, unit in _PERCENTILE.findall(text)
    }
    if {50, 99} - percentiles.keys():
        raise WrkError(f"no latency distribution in wrk output (--latency?):\n{text}")
    socket = _SOCKET.search(text)
    non_2xx = _NON_2XX.search(text)
    return WrkResult(
        requests=int(_match(_REQUESTS, text, "request count").group(1)),
        rps=float(_match(_RPS, text, "Requests/sec").group(1)),
        p50_ms=percentiles[50],
        p99_ms=percentiles[99],
        socket_errors=sum(map(int, socket.groups())) if socket else 0,
        status_errors=int(non_2xx.group(1)) if non_2xx else 0,
    )


def run_wrk(
    url: str,
    connections: int,
    duration_s: int,
    headers: Sequence[tuple[str, str]] = (),
) -> WrkResult:
    """One wrk run: 1 thread at one connection, 2 threads otherwise."""
    threads = 1 if connections == 1 else 2
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    for name, value in headers:
        argv += ["-H", f"{name}: {value}"]
    done = subprocess.run(
        [*argv, url], capture_output=True, text=True, timeout=duration_s + 60, check=False
    )
    if done.returncode != 0:
        raise WrkError(f"wrk exited with {done.returncode}: {done.stderr.strip()}")
    return parse_wrk(done.stdout)
