"""The report's pipeline: parse -> place in the window -> aggregate -> find."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.report.findings import Finding, fails, find
from proxy.report.options import AuditOptions, Window
from proxy.report.records import Event, Malformed, parse_lines
from proxy.report.summary import Summary, summarize
from proxy.report.tally import Baseline, Tally

__all__ = ["Report", "build_report"]


@dataclass(frozen=True, slots=True)
class Report:
    """Aggregates, findings and malformed lines of one run, ready to render."""

    options: AuditOptions
    tally: Tally
    summary: Summary
    baseline: Baseline
    findings: list[Finding]
    malformed: Malformed

    @property
    def failed(self) -> bool:
        """A finding reached `--fail-on`: the exit status is 1."""
        return fails(self.findings, self.options.fail_on)


def _place_event(event: Event, window: Window, tally: Tally) -> None:
    if event.at is None:
        tally.add_event(event)  # it cannot be placed, so it is counted rather than lost
    elif window.before(event.at):
        tally.rotations.add(event)  # a rotation before the window still explains a new token
    elif not window.after(event.at):
        tally.add_event(event)


def build_report(lines: Iterable[tuple[str, Iterable[bytes]]], options: AuditOptions) -> Report:
    """Read each `(source name, lines)` once, keeping only aggregates."""
    window = options.window
    # Plain floats: two comparisons per line instead of two method calls.
    since = -math.inf if window.since is None else window.since
    until = math.inf if window.until is None else window.until
    malformed = Malformed()
    tally = Tally(options)
    baseline = Baseline()
    for record in parse_lines(lines, malformed):
        if isinstance(record, Event):
            _place_event(record, window, tally)
            continue
        at, fields = record
        if at < since:
            baseline.add(fields)
        elif at >= until:
            tally.requests_after += 1
        else:
            tally.add(at, fields)
    summary = summarize(tally)
    findings = find(tally, summary, baseline, options)
    return Report(options, tally, summary, baseline, findings, malformed)
