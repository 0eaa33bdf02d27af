"""Summaries, ratios and PASS/FAIL checks of a benchmark run."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from wrk import WrkResult

__all__ = [
    "Check",
    "Summary",
    "check",
    "format_checks",
    "format_table",
    "ratios",
    "summarise",
]

INVOISX = "invoisx-proxy"
Status = Literal["PASS", "FAIL", "SKIP"]


@dataclass(frozen=True)
class Summary:
    """Medians across rounds of one target at one concurrency; errors summed over rounds."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    rounds: int


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    value: float | None
    limit: str


def summarise(
    runs: Mapping[tuple[str, int], Sequence[WrkResult]],
) -> dict[tuple[str, int], Summary]:
    """Median req/s, p50 and p99 per (target, concurrency)."""
    return {
        key: Summary(
            rps=statistics.median(r.rps for r in results),
            p50_ms=statistics.median(r.p50_ms for r in results),
            p99_ms=statistics.median(r.p99_ms for r in results),
            errors=sum(r.errors for r in results),
            rounds=len(results),
        )
        for key, results in runs.items()
        if results
    }


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(summary: Mapping[tuple[str, int], Summary]) -> dict[str, float | None]:
    """The headline comparisons of invoisx-proxy against the baselines."""

    def rps(target: str, conns: int) -> float | None:
        found = summary.get((target, conns))
        return found.rps if found else None

    def p50(target: str, conns: int) -> float | None:
        found = summary.get((target, conns))
        return found.p50_ms if found else None

    invoisx_p50, direct_p50 = p50(INVOISX, 1), p50("direct", 1)
    return {
        "c32_invoisx_over_nginx_proxy": _div(rps(INVOISX, 32), rps("nginx-proxy", 32)),
        "c32_invoisx_over_mitmproxy": _div(rps(INVOISX, 32), rps("mitmproxy", 32)),
        "c1_added_p50_ms": (
            invoisx_p50 - direct_p50 if invoisx_p50 is not None and direct_p50 is not None else None
        ),
        "invoisx_c256_over_c32": _div(rps(INVOISX, 256), rps(INVOISX, 32)),
    }


def check(
    name: str, value: float | None, *, at_least: float | None = None, at_most: float | None = None
) -> Check:
    """PASS/FAIL `value` against its bounds; SKIP when it was not measured."""
    limit = " and ".join(
        f"{sign} {bound:g}"
        for sign, bound in ((">=", at_least), ("<=", at_most))
        if bound is not None
    )
    if value is None:
        return Check(name, "SKIP", None, limit)
    ok = (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    return Check(name, "PASS" if ok else "FAIL", value, limit)


def format_table(
    summary: Mapping[tuple[str, int], Summary],
    targets: Iterable[str],
    concurrencies: Iterable[int],
) -> str:
    """target x concurrency -> req/s, p50 ms, p99 ms, errors."""
    targets = list(targets)
    width = max([15, *(len(target) + 1 for target in targets)])
    lines = [f"{'target':<{width}}{'conns':>6}{'req/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"]
    for target in targets:
        for conns in concurrencies:
            row = summary.get((target, conns))
            if row is not None:
                lines.append(
                    f"{target:<{width}}{conns:>6}{row.rps:>11.0f}{row.p50_ms:>9.3f}"
                    f"{row.p99_ms:>9.3f}{row.errors:>8}"
                )
    return "\n".join(lines)


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_checks(checks: Sequence[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    return "\n".join(
        f"{c.status}  {c.name:<{width}}  {_value(c.value):>9}  (target {c.limit})" for c in checks
    )
