"""Findings: the unusual activity in a tally, each with a severity and its evidence."""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from proxy.report.options import AuditOptions, Severity
from proxy.report.records import utc_iso
from proxy.report.summary import Summary
from proxy.report.tally import Baseline, Evidence, Tally

__all__ = ["KINDS", "SEVERITY_RANK", "Finding", "fails", "find", "plural"]

SEVERITY_RANK: dict[Severity, int] = {"low": 1, "medium": 2, "high": 3}
# Report order within one severity.
KINDS = (
    "outcome_unknown",
    "auth_failure",
    "new_client",
    "new_fingerprint",
    "burst",
    "repeated_refusals",
    "delete",
    "cancel",
    "outside_hours",
)


def plural(count: int, noun: str) -> str:
    """`1 call`, `2 calls`."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


@dataclass(frozen=True, slots=True)
class Finding:
    """One piece of unusual activity; `request_ids` are the first of `evidence_count` lines."""

    severity: Severity
    kind: str
    message: str
    request_ids: tuple[str, ...]
    evidence_count: int
    client: str | None = None
    fingerprint: str | None = None


def _finding(
    severity: Severity,
    kind: str,
    message: str,
    evidence: tuple[Sequence[str], int],
    *,
    client: str | None = None,
    fingerprint: str | None = None,
) -> Finding:
    request_ids, count = evidence
    return Finding(
        severity, kind, message, tuple(request_ids), count, client=client, fingerprint=fingerprint
    )


def _of(evidence: Evidence) -> tuple[Sequence[str], int]:
    return evidence.request_ids, evidence.count


def _auth_failures(tally: Tally, summary: Summary) -> Iterator[Finding]:
    for fingerprint, evidence in tally.auth_failures.items():
        codes = summary.auth_failure_codes[fingerprint].most_common()
        detail = ", ".join(f"{code} {count}" for code, count in codes)
        yield _finding(
            "high",
            "auth_failure",
            f"InvoisX refused token {fingerprint} {plural(evidence.count, 'time')} ({detail}): "
            "revoked, expired early or no longer linked to the company",
            _of(evidence),
            fingerprint=fingerprint,
        )


def _unknown_outcomes(tally: Tally) -> Iterator[Finding]:
    for client, evidence in tally.unknown_outcomes.items():
        yield _finding(
            "high",
            "outcome_unknown",
            f"client {client!r}: {plural(evidence.count, 'call')} with an Idempotency-Key sent "
            "to InvoisX and never answered: look these documents up in InvoisX before they "
            "are sent again",
            _of(evidence),
            client=client,
        )


def _new_clients(tally: Tally, summary: Summary, baseline: Baseline) -> Iterator[Finding]:
    for client, counts in summary.clients.items():
        if client in baseline.clients:
            continue
        yield _finding(
            "medium",
            "new_client",
            f"client {client!r} first called at {utc_iso(counts.first_seen)}, and not in the "
            f"{baseline.requests} requests before the window",
            (tally.activity[client].first_ids, counts.requests),
            client=client,
        )


def _new_fingerprints(tally: Tally, summary: Summary, baseline: Baseline) -> Iterator[Finding]:
    for fingerprint, use in summary.tokens.items():
        if fingerprint in baseline.fingerprints:
            continue
        first = utc_iso(use.first_used)
        evidence = (tally.token_ids[fingerprint], use.requests)
        loaded = tally.rotations.loaded_at.get(fingerprint)
        if loaded is not None:
            yield _finding(
                "low",
                "new_fingerprint",
                f"token {fingerprint} first used at {first}, loaded by a rotation at "
                f"{utc_iso(loaded)}",
                evidence,
                fingerprint=fingerprint,
            )
        else:
            yield _finding(
                "medium",
                "new_fingerprint",
                f"token {fingerprint} first used at {first}, with no token_reloaded line "
                "announcing it (a restart with another token, or another proxy)",
                evidence,
                fingerprint=fingerprint,
            )


def _bursts(tally: Tally, options: AuditOptions) -> Iterator[Finding]:
    factor, floor = options.thresholds.burst_factor, options.thresholds.burst_min
    for client, activity in tally.activity.items():
        minutes = activity.minutes
        median = statistics.median(minutes.values())
        threshold = max(floor, factor * median)
        bursts = sorted(
            (minute for minute, count in minutes.items() if count >= threshold),
            key=lambda minute: (-minutes[minute], minute),
        )
        if not bursts:
            continue
        kept = activity.busiest.ids
        ids = [id_ for minute in bursts for id_ in kept.get(minute, [])]
        evidence = (ids[: options.evidence_cap], sum(minutes[minute] for minute in bursts))
        peak = bursts[0]
        yield _finding(
            "medium",
            "burst",
            f"client {client!r}: {plural(len(bursts), 'minute')} with at least {threshold:g} "
            f"requests against a median of {median:g} per active minute; the busiest had "
            f"{minutes[peak]} at {utc_iso(peak * 60.0)}",
            evidence,
            client=client,
        )


def _refusals(tally: Tally, summary: Summary, options: AuditOptions) -> Iterator[Finding]:
    for client, evidence in tally.refusals.items():
        if evidence.count < options.thresholds.refusals:
            continue
        counts = summary.clients[client]
        yield _finding(
            "medium",
            "repeated_refusals",
            f"client {client!r}: {plural(evidence.count, 'call')} refused by the proxy (denied "
            f"{counts.denied}, expired {counts.expired}, invalid {counts.invalid})",
            _of(evidence),
            client=client,
        )


def _deletions(tally: Tally, summary: Summary) -> Iterator[Finding]:
    for (client, kind), evidence in tally.deletions.items():
        done = summary.deletions_done[client, kind]
        what = "DELETE call" if kind == "delete" else "cancellation (POST .../cancel)"
        yield _finding(
            # Only what InvoisX carried out changed data; refused attempts are context.
            "medium" if done else "low",
            kind,
            f"client {client!r}: {plural(evidence.count, what)}, {done} carried out by InvoisX",
            _of(evidence),
            client=client,
        )


def _after_hours(tally: Tally, options: AuditOptions) -> Iterator[Finding]:
    for client, activity in tally.activity.items():
        count = tally.after_hours(client)
        if not count:
            continue
        yield _finding(
            "low",
            "outside_hours",
            f"client {client!r}: {plural(count, 'call')} outside business hours "
            f"({options.hours.label})",
            (activity.after_hours_ids, count),
            client=client,
        )


def find(
    tally: Tally, summary: Summary, baseline: Baseline, options: AuditOptions
) -> list[Finding]:
    """Every finding, the most severe first."""
    findings = [
        *_unknown_outcomes(tally),
        *_auth_failures(tally, summary),
        *_bursts(tally, options),
        *_refusals(tally, summary, options),
        *_deletions(tally, summary),
        *_after_hours(tally, options),
    ]
    # New names mean something only against a history: lines before --since.
    if baseline.requests:
        findings += [
            *_new_clients(tally, summary, baseline),
            *_new_fingerprints(tally, summary, baseline),
        ]
    return sorted(
        findings,
        key=lambda finding: (
            -SEVERITY_RANK[finding.severity],
            KINDS.index(finding.kind),
            finding.client or "",
            finding.fingerprint or "",
        ),
    )


def fails(findings: list[Finding], fail_on: Severity | None) -> bool:
    """True when a finding reaches `fail_on` (None: never)."""
    if fail_on is None:
        return False
    return any(SEVERITY_RANK[finding.severity] >= SEVERITY_RANK[fail_on] for finding in findings)
