"""Aggregation: what the report needs from the lines, kept as counters.

Memory grows with the number of clients, routes, tokens and active minutes, never with the
number of lines: evidence is a capped list of request ids per finding candidate.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from proxy.report.options import AuditOptions, BusinessHours
from proxy.report.records import Event, Request

__all__ = [
    "AUTH_FAILURE_CODES",
    "REFUSALS",
    "Baseline",
    "BusiestMinutes",
    "Counts",
    "Evidence",
    "Tally",
    "TokenUse",
]

# InvoisX refusing the token itself (revoked, expired early, unlinked from the company), as
# opposed to FORBIDDEN, which is about one call's permission.
AUTH_FAILURE_CODES = frozenset({"UNAUTHORIZED", "TOKEN_EXPIRED", "COMPANY_ACCESS_DENIED"})
REFUSALS = ("denied", "expired", "invalid")


def is_auth_failure(request: Request) -> bool:
    return (
        request.decision == "forwarded"
        and request.status in (401, 403)
        and request.error_code in AUTH_FAILURE_CODES
    )


@dataclass(slots=True)
class Evidence:
    """How many lines back a finding, and the request ids of the first `cap` of them."""

    cap: int
    count: int = 0
    request_ids: list[str] = field(default_factory=list)

    def add(self, request_id: str | None) -> None:
        self.count += 1
        if request_id is not None and len(self.request_ids) < self.cap:
            self.request_ids.append(request_id)


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

    def add(self, request: Request, auth_failure: bool) -> None:
        self.requests += 1
        decision = request.decision
        if decision == "denied":
            self.denied += 1
        elif decision == "expired":
            self.expired += 1
        elif decision == "invalid":
            self.invalid += 1
        if auth_failure:
            self.auth_failures += 1
        if request.status >= 400:
            self.errors += 1
        self.first_seen = min(self.first_seen, request.at)
        self.last_seen = max(self.last_seen, request.at)

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
    """One token fingerprint: how often and when it was used, and when a rotation replaced it."""

    evidence: Evidence  # the first requests, should the fingerprint be new
    requests: int = 0
    first_used: float = math.inf
    last_used: float = -math.inf

    def add(self, request: Request) -> None:
        self.requests += 1
        self.first_used = min(self.first_used, request.at)
        self.last_used = max(self.last_used, request.at)
        self.evidence.add(request.request_id)


class BusiestMinutes:
    """Request ids of a client's busiest minutes, the evidence of a burst.

    Which minutes are bursts is known only at the end (it depends on the median), so this keeps
    ids for the `cap` busiest minutes seen so far, `cap` ids each, and only for minutes that
    reached the burst floor: memory stays bounded however long the log.
    """

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self.ids: dict[int, list[str]] = {}
        self._floor = 0  # a lower bound of the smallest count among the kept minutes

    def note(self, minute: int, count: int, request_id: str | None, counts: dict[int, int]) -> None:
        ids = self.ids.get(minute)
        if ids is None:
            if len(self.ids) >= self._cap:
                if count <= self._floor:
                    return
                quietest = min(self.ids, key=counts.__getitem__)
                self._floor = counts[quietest]
                if count <= self._floor:
                    return
                del self.ids[quietest]
            ids = self.ids[minute] = []
        if request_id is not None and len(ids) < self._cap:
            ids.append(request_id)


@dataclass(slots=True)
class Rotations:
    """What `token_reloaded` lines said: when each fingerprint was replaced or loaded."""

    replaced_at: dict[str, float] = field(default_factory=dict)
    loaded_at: dict[str, float] = field(default_factory=dict)

    def add(self, event: Event) -> None:
        if event.name != "token_reloaded" or event.at is None:
            return
        if event.old_fingerprint:
            self.replaced_at[event.old_fingerprint] = event.at
        if event.new_fingerprint:
            self.loaded_at[event.new_fingerprint] = event.at


@dataclass(slots=True)
class Baseline:
    """Lines before `--since`: not reported, only read to know which clients and tokens are old."""

    requests: int = 0
    clients: set[str] = field(default_factory=set)
    fingerprints: set[str] = field(default_factory=set)

    def add(self, request: Request) -> None:
        self.requests += 1
        self.clients.add(request.client)
        if request.fingerprint is not None:
            self.fingerprints.add(request.fingerprint)


class Tally:
    """Every aggregate of the requests and events inside the window."""

    def __init__(self, options: AuditOptions) -> None:
        self._cap = options.evidence_cap
        self._burst_min = options.thresholds.burst_min
        self._hours: BusinessHours = options.hours
        self.requests = 0
        self.first_request = math.inf
        self.last_request = -math.inf
        self.outside_window = 0
        self.clients: dict[str, Counts] = {}
        self.routes: dict[tuple[str, str, str], Counts] = {}  # (client, method, route)
        self.statuses: Counter[int] = Counter()
        self.decisions: Counter[str] = Counter()
        self.tokens: dict[str, TokenUse] = {}
        self.events: Counter[str] = Counter()
        self.rotations = Rotations()
        # Finding candidates, by client or fingerprint.
        self.client_evidence: dict[str, Evidence] = {}
        self.auth_failures: dict[str, Evidence] = {}
        self.auth_failure_codes: dict[str, Counter[str]] = {}
        self.refusals: dict[str, Evidence] = {}
        self.deletions: dict[tuple[str, str], Evidence] = {}  # (client, "delete" | "cancel")
        self.deletions_done: Counter[tuple[str, str]] = Counter()
        self.after_hours: dict[str, Evidence] = {}
        self.minutes: dict[str, dict[int, int]] = {}  # client -> minute -> requests
        self.busiest: dict[str, BusiestMinutes] = {}
        # Minute -> within business hours; bounded by the minutes the log spans.
        self._business_minute: dict[int, bool] = {}

    def _evidence(self, table: dict[str, Evidence], key: str) -> Evidence:
        evidence = table.get(key)
        if evidence is None:
            evidence = table[key] = Evidence(self._cap)
        return evidence

    def add_event(self, event: Event) -> None:
        self.events[event.name] += 1
        self.rotations.add(event)

    def add(self, request: Request) -> None:
        """Count one request inside the window."""
        self.requests += 1
        self.first_request = min(self.first_request, request.at)
        self.last_request = max(self.last_request, request.at)
        self.statuses[request.status] += 1
        self.decisions[request.decision] += 1
        auth_failure = is_auth_failure(request)
        client = request.client
        counts = self.clients.get(client)
        if counts is None:
            counts = self.clients[client] = Counts()
        counts.add(request, auth_failure)
        key = (client, request.method, request.route)
        route = self.routes.get(key)
        if route is None:
            route = self.routes[key] = Counts()
        route.add(request, auth_failure)
        self._evidence(self.client_evidence, client).add(request.request_id)
        if request.fingerprint is not None:
            self._token(request)
        if auth_failure:
            self._auth_failure(request)
        if request.decision in REFUSALS:
            self._evidence(self.refusals, client).add(request.request_id)
        self._deletion(request)
        self._rate(request)

    def _token(self, request: Request) -> None:
        fingerprint = request.fingerprint
        assert fingerprint is not None
        use = self.tokens.get(fingerprint)
        if use is None:
            use = self.tokens[fingerprint] = TokenUse(Evidence(self._cap))
        use.add(request)

    def _auth_failure(self, request: Request) -> None:
        fingerprint = request.fingerprint or "unknown"
        self._evidence(self.auth_failures, fingerprint).add(request.request_id)
        codes = self.auth_failure_codes.setdefault(fingerprint, Counter())
        codes[request.error_code or ""] += 1

    def _deletion(self, request: Request) -> None:
        if request.method == "DELETE":
            kind = "delete"
        elif request.method == "POST" and request.route.endswith("/cancel"):
            kind = "cancel"
        else:
            return
        key = (request.client, kind)
        evidence = self.deletions.get(key)
        if evidence is None:
            evidence = self.deletions[key] = Evidence(self._cap)
        evidence.add(request.request_id)
        if request.decision == "forwarded" and request.status < 400:
            self.deletions_done[key] += 1

    def _rate(self, request: Request) -> None:
        client = request.client
        minute = int(request.at // 60)
        minutes = self.minutes.get(client)
        if minutes is None:
            minutes = self.minutes[client] = {}
            self.busiest[client] = BusiestMinutes(self._cap)
        count = minutes[minute] = minutes.get(minute, 0) + 1
        if count >= self._burst_min:
            self.busiest[client].note(minute, count, request.request_id, minutes)
        business = self._business_minute.get(minute)
        if business is None:
            business = self._business_minute[minute] = self._hours.contains(minute * 60.0)
        if not business:
            self._evidence(self.after_hours, client).add(request.request_id)
