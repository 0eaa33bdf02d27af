"""Rendering a report: readable text for a terminal, JSON for SIEMs and scripts, CSV."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any, get_args

import orjson

from proxy.errors import Decision
from proxy.report.build import Report
from proxy.report.findings import SEVERITY_RANK, Finding, plural
from proxy.report.records import utc_iso
from proxy.report.summary import Counts, Summary

__all__ = ["CSV_COLUMNS", "JSON_KEYS", "render", "report_dict"]

JSON_KEYS = (
    "window",
    "total",
    "by_client",
    "by_route",
    "by_status",
    "decisions",
    "fingerprints",
    "findings",
    "malformed_lines",
)
CSV_COLUMNS = (
    "client",
    "method",
    "route",
    "requests",
    "denied",
    "expired",
    "auth_failures",
    "errors",
    "first_seen",
    "last_seen",
)
# The proxy's own decisions in the order they are declared; any other value follows by name.
_DECISION_ORDER = get_args(Decision)


def _precise(at: float) -> str | None:
    return utc_iso(at, "microseconds") if math.isfinite(at) else None


def _decisions(summary: Summary) -> dict[str, int]:
    def rank(name: str) -> tuple[int, str]:
        known = name in _DECISION_ORDER
        return (_DECISION_ORDER.index(name) if known else len(_DECISION_ORDER), name)

    return {name: summary.decisions[name] for name in sorted(summary.decisions, key=rank)}


def _counts(counts: Counts) -> dict[str, Any]:
    return {
        "requests": counts.requests,
        "denied": counts.denied,
        "expired": counts.expired,
        "invalid": counts.invalid,
        "auth_failures": counts.auth_failures,
        "errors": counts.errors,
        "first_seen": _precise(counts.first_seen),
        "last_seen": _precise(counts.last_seen),
    }


def _by_route(summary: Summary) -> dict[str, int]:
    routes: dict[str, int] = {}
    for (_, method, route), counts in summary.routes.items():
        key = f"{method} {route}"
        routes[key] = routes.get(key, 0) + counts.requests
    return dict(sorted(routes.items(), key=lambda item: (item[0].partition(" ")[2], item[0])))


def _finding(finding: Finding) -> dict[str, Any]:
    return {
        "severity": finding.severity,
        "kind": finding.kind,
        "message": finding.message,
        "client": finding.client,
        "fingerprint": finding.fingerprint,
        "evidence_count": finding.evidence_count,
        "request_ids": list(finding.request_ids),
    }


def report_dict(report: Report) -> dict[str, Any]:
    """The report as JSON-ready data, with the top-level keys of `JSON_KEYS`."""
    tally, summary, window = report.tally, report.summary, report.options.window
    return {
        "window": {
            "since": None if window.since is None else _precise(window.since),
            "until": None if window.until is None else _precise(window.until),
            "first_request": _precise(summary.first_request),
            "last_request": _precise(summary.last_request),
            "requests_before": report.baseline.requests,
            "requests_after": tally.requests_after,
            "events": dict(sorted(tally.events.items())),
        },
        "total": summary.requests,
        "by_client": {name: _counts(summary.clients[name]) for name in sorted(summary.clients)},
        "by_route": _by_route(summary),
        "by_status": {str(code): summary.statuses[code] for code in sorted(summary.statuses)},
        "decisions": _decisions(summary),
        "fingerprints": {
            fingerprint: {
                "first_used": _precise(use.first_used),
                "last_used": _precise(use.last_used),
                "requests": use.requests,
                "replaced_at": _precise(tally.rotations.replaced_at.get(fingerprint, math.nan)),
            }
            for fingerprint, use in sorted(summary.tokens.items())
        },
        "findings": [_finding(finding) for finding in report.findings],
        "malformed_lines": {
            "count": report.malformed.count,
            "first_line_numbers": [number for _, number in report.malformed.first],
            "first_locations": [f"{name}:{number}" for name, number in report.malformed.first],
        },
    }


def _csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    rows = sorted(report.summary.routes.items(), key=lambda row: (row[0][0], row[0][2], row[0][1]))
    for (client, method, route), counts in rows:
        row = _counts(counts)
        writer.writerow([client, method, route, *(row[column] for column in CSV_COLUMNS[3:])])
    return out.getvalue()


def _printable(value: object) -> str:
    # Names come from log lines: an escape sequence must not reach the operator's terminal.
    text = str(value)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """`title`, then columns padded to their widest cell, numbers right-aligned; a table
    without rows is `title: none`, as a header alone would read as a table cut off."""
    cells = [list(headers), *([_printable(cell) for cell in row] for row in rows)]
    if len(cells) == 1:
        return [f"{title}: none"]
    numeric = [all(row[i].isdecimal() for row in cells[1:]) for i in range(len(headers))]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        title,
        *(
            "  "
            + "  ".join(
                cell.rjust(width) if right else cell.ljust(width)
                for cell, width, right in zip(row, widths, numeric, strict=True)
            ).rstrip()
            for row in cells
        ),
    ]


def _listing(title: str, items: Iterable[str]) -> str:
    """`title: a, b, c` on one line, or `title: none`."""
    return f"{title}: {', '.join(items) or 'none'}"


def _when(at: float) -> str:
    return utc_iso(at) if math.isfinite(at) else "-"


def _counts_row(counts: Counts) -> list[object]:
    return [
        counts.requests,
        counts.denied,
        counts.expired,
        counts.invalid,
        counts.auth_failures,
        counts.errors,
        _when(counts.first_seen),
        _when(counts.last_seen),
    ]


# A person reads a few request ids; JSON carries up to the evidence cap.
_TEXT_IDS = 5
_COUNT_HEADERS = ("requests", "denied", "expired", "invalid", "auth fail", "errors")


def _text_header(report: Report) -> list[str]:
    summary, window, baseline = report.summary, report.options.window, report.baseline
    since = "the start" if window.since is None else _when(window.since)
    until = "the end" if window.until is None else _when(window.until)
    lines = [
        f"InvoisX proxy audit: {plural(summary.requests, 'request')} from "
        f"{plural(len(summary.clients), 'client')}, {since} to {until} (times in UTC)",
    ]
    if summary.requests:
        first, last = _when(summary.first_request), _when(summary.last_request)
        lines.append(f"  first request {first}, last {last}")
    if window.since is not None:
        known = "read to learn the known clients and tokens" if baseline.requests else "none is new"
        lines.append(f"  before the window: {plural(baseline.requests, 'request')}, {known}")
    if report.tally.requests_after:
        lines.append(f"  after the window: {plural(report.tally.requests_after, 'request')}")
    malformed = report.malformed
    if malformed.count:
        where = ", ".join(f"{name}:{number}" for name, number in malformed.first)
        lines.append(f"  skipped: {plural(malformed.count, 'malformed line')} (first: {where})")
    return lines


def _text_findings(findings: list[Finding]) -> list[str]:
    if not findings:
        return ["Findings: none"]
    by_severity = ", ".join(
        f"{sum(f.severity == severity for f in findings)} {severity}"
        for severity in sorted(SEVERITY_RANK, key=SEVERITY_RANK.__getitem__, reverse=True)
    )
    lines = [f"Findings: {by_severity}"]
    for finding in findings:
        lines.append(f"  {finding.severity.upper():<6}  {finding.kind:<17}  {finding.message}")
        shown = finding.request_ids[:_TEXT_IDS]
        more = finding.evidence_count - len(shown)
        ids = ", ".join(shown) + (f" and {more} more" if more > 0 else "")
        evidence = plural(finding.evidence_count, "line")
        lines.append(f"  {'':<6}  {'':<17}  {evidence}: {ids or '-'}")
    return lines


def _text(report: Report) -> str:
    tally, summary = report.tally, report.summary
    clients = sorted(summary.clients.items(), key=lambda item: (-item[1].requests, item[0]))
    routes: dict[tuple[str, str], Counts] = {}
    for (_, method, route), counts in summary.routes.items():
        routes.setdefault((route, method), Counts()).merge(counts)
    tokens = sorted(summary.tokens.items(), key=lambda item: item[1].first_used)
    replaced = tally.rotations.replaced_at
    decisions, events = _decisions(summary), sorted(tally.events.items())
    sections = [
        _text_header(report),
        _text_findings(report.findings),
        _table(
            "Clients",
            ("client", *_COUNT_HEADERS, "first seen", "last seen"),
            ([name, *_counts_row(counts)] for name, counts in clients),
        ),
        _table(
            "Routes",
            ("method", "route", *_COUNT_HEADERS),
            ([m, r, *_counts_row(c)[:6]] for (r, m), c in sorted(routes.items())),
        ),
        [
            _listing("Statuses", (f"{s} {n:,}" for s, n in sorted(summary.statuses.items()))),
            _listing("Decisions", (f"{_printable(d)} {n:,}" for d, n in decisions.items())),
            _listing("Other events", (f"{_printable(e)} {n:,}" for e, n in events)),
        ],
        _table(
            "Token fingerprints",
            ("fingerprint", "requests", "first used", "last used", "replaced at"),
            (
                [fp, use.requests, _when(use.first_used), _when(use.last_used), _when(at)]
                for fp, use in tokens
                for at in [replaced.get(fp, math.nan)]
            ),
        ),
    ]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def render(report: Report) -> str:
    """The report in the format of `--format`."""
    output = report.options.output
    if output == "json":
        return orjson.dumps(report_dict(report), option=orjson.OPT_INDENT_2).decode() + "\n"
    if output == "csv":
        return _csv(report)
    return _text(report)
