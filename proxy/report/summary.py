"""The report's tables, derived once from the tally's groups after the last line."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from proxy.report.records import NO_ROUTE, UNKNOWN
from proxy.report.tally import AUTH_FAILURE_CODES, Group, Tally, deletion_kind

__all__ = ["Counts", "Summary", "TokenUse", "summarize"]

# The proxy logs at most 16 characters of a method; older or foreign lines get the same bound.
_MAX_METHOD = 16


@dataclass(slots=True)
class Counts:
    """Requests of one client, or of one client on one route."""

    requests: int = 0
    denied: int = 0
    expired: int = 0
    invalid: int = 0
    auth_failures: int = 0
    errors: int = 0  # status 400 or above, refusals and auth failures included
    first_seen: float = math.inf
    last_seen: float = -math.inf

    def add(self, group: Group, decision: str, status: int, auth_failure: bool) -> None:
        count = group.count
        self.requests += count
        self.denied += count if decision == "denied" else 0
        self.expired += count if decision == "expired" else 0
        self.invalid += count if decision == "invalid" else 0
        self.auth_failures += count if auth_failure else 0
        self.errors += count if status >= 400 else 0
        self.first_seen = min(self.first_seen, group.first)
        self.last_seen = max(self.last_seen, group.last)

    def merge(self, other: Counts) -> None:
        self.requests += other.requests
        self.denied += other.denied
        self.expired += other.expired
        self.invalid += other.invalid
        self.auth_failures += other.auth_failures
        self.errors += other.errors
        self.first_seen = min(self.first_seen, other.first_seen)
        self.last_seen = max(self.last_seen, other.last_seen)


@dataclass(slots=True)
class TokenUse:
    """One token fingerprint: how often and when it was used."""

    requests: int = 0
    first_used: float = math.inf
    last_used: float = -math.inf


@dataclass(slots=True)
class Summary:
    """Counts by client, route, status, decision and token, over the window."""

    requests: int = 0
    first_request: float = math.inf
    last_request: float = -math.inf
    clients: dict[str, Counts] = field(default_factory=dict)
    routes: dict[tuple[str, str, str], Counts] = field(
        default_factory=dict
    )  # client, method, route
    statuses: Counter[int] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    tokens: dict[str, TokenUse] = field(default_factory=dict)
    auth_failure_codes: dict[str, Counter[str]] = field(default_factory=dict)  # by fingerprint
    deletions_done: Counter[tuple[str, str]] = field(default_factory=Counter)  # client, kind

    def add(self, key: tuple[object, ...], group: Group) -> None:
        client, method, route, status, decision, error_code, fingerprint = key
        assert type(client) is str and type(status) is int
        method = method[:_MAX_METHOD] if type(method) is str else UNKNOWN
        route = route if type(route) is str else NO_ROUTE
        decision = decision if type(decision) is str else UNKNOWN
        auth_failure = (
            decision == "forwarded" and status in (401, 403) and error_code in AUTH_FAILURE_CODES
        )
        self.requests += group.count
        self.first_request = min(self.first_request, group.first)
        self.last_request = max(self.last_request, group.last)
        self.statuses[status] += group.count
        self.decisions[decision] += group.count
        self.clients.setdefault(client, Counts()).add(group, decision, status, auth_failure)
        route_counts = self.routes.setdefault((client, method, route), Counts())
        route_counts.add(group, decision, status, auth_failure)
        if type(fingerprint) is str:
            use = self.tokens.setdefault(fingerprint, TokenUse())
            use.requests += group.count
            use.first_used = min(use.first_used, group.first)
            use.last_used = max(use.last_used, group.last)
        if auth_failure:
            codes = self.auth_failure_codes.setdefault(str(fingerprint or UNKNOWN), Counter())
            codes[str(error_code)] += group.count
        kind = deletion_kind(method, route)
        if kind is not None and decision == "forwarded" and status < 400:
            self.deletions_done[client, kind] += group.count


def summarize(tally: Tally) -> Summary:
    """Every table of the report, from the groups the tally kept."""
    summary = Summary()
    for key, group in tally.groups.items():
        summary.add(key, group)
    return summary
