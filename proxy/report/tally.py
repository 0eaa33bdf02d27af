"""Aggregation: each request inside the window, folded into counters as it streams by.

Memory grows with the number of distinct (client, method, route, status, decision, error
code, token) combinations and of active minutes per client, never with the number of lines:
evidence is a capped list of request ids per finding candidate.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from proxy.report.options import AuditOptions
from proxy.report.records import UNKNOWN, Event, derive_route

__all__ = [
    "AUTH_FAILURE_CODES",
    "OUTCOME_UNKNOWN",
    "REFUSALS",
    "Activity",
    "Baseline",
    "BusiestMinutes",
    "Evidence",
    "Group",
    "GroupKey",
    "Rotations",
    "Tally",
    "deletion_kind",
    "group_key",
]

# InvoisX refusing the token itself (revoked, expired early, unlinked from the company), as
# opposed to FORBIDDEN, which is about one call's permission.
AUTH_FAILURE_CODES = frozenset({"UNAUTHORIZED", "TOKEN_EXPIRED", "COMPANY_ACCESS_DENIED"})
REFUSALS = frozenset({"denied", "expired", "invalid"})
# The error code of a repeat refused because its key's first call went unanswered.
OUTCOME_UNKNOWN = "IDEMPOTENCY_OUTCOME_UNKNOWN"
_ABSENT = object()
# uvicorn's messages are events too, and some carry a pid or an address: bound the names kept.
_MAX_EVENT_NAMES = 100
OTHER_EVENTS = "(other)"

# (client, method, route, status, decision, error_code, token fingerprint), as logged: only
# `client` and the fingerprint are checked per line; `summary` normalises the rest once per group.
GroupKey = tuple[str, Any, Any, int, Any, Any, str | None]


def deletion_kind(method: object, route: object) -> str | None:
    """`delete` for a DELETE, `cancel` for a POST to a route ending in /cancel, else None."""
    if method == "DELETE":
        return "delete"
    if method == "POST" and type(route) is str and route.endswith("/cancel"):
        return "cancel"
    return None


def _hashable(value: object) -> Any:
    return value if isinstance(value, str | int | float | bool | None) else UNKNOWN


def _clean(key: tuple[Any, ...]) -> GroupKey:
    client, method, route, status, decision, error_code, fingerprint = map(_hashable, key)
    return (
        client if type(client) is str else UNKNOWN,
        method,
        route,
        status,  # parse_lines passes only int statuses
        decision,
        error_code,
        fingerprint if type(fingerprint) is str else None,
    )


_GROUP_FIELDS = operator.itemgetter(
    "client", "method", "route", "status", "decision", "error_code", "token_fingerprint"
)


def group_key(fields: dict[str, Any]) -> GroupKey:
    """The fields a request is counted by; a name that is not a string becomes `unknown`."""
    try:
        key: GroupKey = _GROUP_FIELDS(fields)  # one C call for the usual, complete line
    except KeyError:  # an older or partial line
        route = fields.get("route", _ABSENT)
        if route is _ABSENT:  # written before the proxy logged routes
            route = derive_route(fields.get("path"))
        key = (
            fields.get("client"),  # type: ignore[assignment]
            fields.get("method"),
            route,
            fields["status"],
            fields.get("decision"),
            fields.get("error_code"),
            fields.get("token_fingerprint"),
        )
    fingerprint = key[6]
    if type(key[0]) is not str or not (fingerprint is None or type(fingerprint) is str):
        return _clean(key)
    return key


@dataclass(slots=True)
class Group:
    """Requests that share every reported field but their time."""

    count: int
    first: float
    last: float


@dataclass(slots=True)
class Evidence:
    """How many lines back a finding, and the request ids of the first `cap` of them."""

    cap: int
    count: int = 0
    request_ids: list[str] = field(default_factory=list)

    def add(self, request_id: object) -> None:
        self.count += 1
        if type(request_id) is str and len(self.request_ids) < self.cap:
            self.request_ids.append(request_id)


class BusiestMinutes:
    """Request ids of a client's busiest minutes: the evidence of a burst.

    Which minutes are bursts is known only at the end (it depends on the median), so this keeps
    ids for the `cap` busiest minutes seen so far, `cap` ids each, and only for minutes that
    reached the burst floor: memory stays bounded however long the log.
    """

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self.ids: dict[float, list[str]] = {}
        self._floor = 0  # at most the smallest count among the kept minutes

    def note(self, minute: float, request_id: object, counts: dict[float, int]) -> None:
        ids = self.ids.get(minute)
        if ids is None:
            if len(self.ids) >= self._cap and not self._evict_below(counts[minute], counts):
                return
            ids = self.ids[minute] = []
        if type(request_id) is str and len(ids) < self._cap:
            ids.append(request_id)

    def _evict_below(self, count: int, counts: dict[float, int]) -> bool:
        if count <= self._floor:
            return False
        quietest = min(self.ids, key=counts.__getitem__)
        self._floor = counts[quietest]
        if count <= self._floor:
            return False
        del self.ids[quietest]
        return True


class Activity:
    """One client's requests per minute, with the request ids findings about them may cite."""

    __slots__ = ("after_hours_ids", "busiest", "first_ids", "minutes")

    def __init__(self, cap: int) -> None:
        self.minutes: dict[float, int] = {}  # minute (Unix seconds // 60) -> requests
        self.first_ids: list[str] = []  # should the client be new
        self.after_hours_ids: list[str] = []  # the first calls outside business hours
        self.busiest = BusiestMinutes(cap)


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

    def add(self, fields: dict[str, Any]) -> None:
        self.requests += 1
        client, fingerprint = fields.get("client"), fields.get("token_fingerprint")
        self.clients.add(client if type(client) is str else UNKNOWN)
        if type(fingerprint) is str:
            self.fingerprints.add(fingerprint)


class Tally:
    """Every aggregate of the requests and events inside the window."""

    def __init__(self, options: AuditOptions) -> None:
        self._cap = options.evidence_cap
        self._burst_min = options.thresholds.burst_min
        self._hours = options.hours
        self.requests_after = 0  # past --until: skipped, only counted
        self.groups: dict[GroupKey, Group] = {}
        self.activity: dict[str, Activity] = {}
        self.token_ids: dict[str, list[str]] = {}  # a fingerprint's first request ids
        self.events: Counter[str] = Counter()
        self.rotations = Rotations()
        # Finding candidates, by fingerprint, client or (client, "delete" | "cancel").
        self.auth_failures: dict[str, Evidence] = {}
        self.refusals: dict[str, Evidence] = {}
        self.deletions: dict[tuple[str, str], Evidence] = {}
        self.unknown_outcomes: dict[str, Evidence] = {}
        # Minute -> within business hours; bounded by the minutes the log spans.
        self.business_minutes: dict[float, bool] = {}

    def add_event(self, event: Event) -> None:
        name = event.name
        if name not in self.events and len(self.events) >= _MAX_EVENT_NAMES:
            name = OTHER_EVENTS
        self.events[name] += 1
        self.rotations.add(event)

    def add(self, at: float, fields: dict[str, Any]) -> None:
        """Count one request inside the window: the hot path, kept to plain operations."""
        key = group_key(fields)
        try:
            group = self.groups.get(key)
        except TypeError:  # a list or an object where a name belongs
            key = _clean(key)
            group = self.groups.get(key)
        if group is None:
            self.groups[key] = Group(1, at, at)
        else:
            group.count += 1
            if at < group.first:
                group.first = at
            elif at > group.last:
                group.last = at
        client, method, route, status, decision, error_code, fingerprint = key
        request_id = fields.get("request_id")
        self._activity(client, at, request_id)
        if fingerprint is not None:
            self._token(fingerprint, request_id)
        if decision in REFUSALS:
            self._candidate(self.refusals, client, request_id)
        elif status in (401, 403) and decision == "forwarded" and error_code in AUTH_FAILURE_CODES:
            self._candidate(self.auth_failures, fingerprint or UNKNOWN, request_id)
        if method == "DELETE" or method == "POST":
            kind = deletion_kind(method, route)
            if kind is not None:
                self._candidate(self.deletions, (client, kind), request_id)
        # The lost call itself, not the repeats refused for it.
        if fields.get("idempotency") == "unknown" and error_code != OUTCOME_UNKNOWN:
            self._candidate(self.unknown_outcomes, client, request_id)

    def _candidate(self, table: dict[Any, Evidence], key: object, request_id: object) -> None:
        evidence = table.get(key)
        if evidence is None:
            evidence = table[key] = Evidence(self._cap)
        evidence.add(request_id)

    def _token(self, fingerprint: str, request_id: object) -> None:
        ids = self.token_ids.get(fingerprint)
        if ids is None:
            ids = self.token_ids[fingerprint] = []
        if len(ids) < self._cap and type(request_id) is str:
            ids.append(request_id)

    def _activity(self, client: str, at: float, request_id: object) -> None:
        activity = self.activity.get(client)
        if activity is None:
            activity = self.activity[client] = Activity(self._cap)
        if len(activity.first_ids) < self._cap and type(request_id) is str:
            activity.first_ids.append(request_id)
        minute = at // 60
        minutes = activity.minutes
        count = minutes[minute] = minutes.get(minute, 0) + 1
        if count >= self._burst_min:
            activity.busiest.note(minute, request_id, minutes)
        business = self.business_minutes.get(minute)
        if business is None:
            business = self.business_minutes[minute] = self._hours.contains(minute * 60)
        ids = activity.after_hours_ids
        if not business and len(ids) < self._cap and type(request_id) is str:
            ids.append(request_id)

    def after_hours(self, client: str) -> int:
        """How many of `client`'s requests fell outside business hours."""
        business = self.business_minutes
        return sum(n for minute, n in self.activity[client].minutes.items() if not business[minute])
