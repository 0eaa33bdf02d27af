"""Parsing: each JSON line of the proxy's log becomes a request, an `Event`, or a malformed line.

This is the per-line hot path of the report (a million lines should take seconds): a request
stays the dict orjson made, no regex runs, and each timestamp's minute is parsed only once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from proxy.errors import ProxyError
from proxy.report.source import READ_ERRORS, unreadable
from proxy.stages.target import parse_target, route_template

__all__ = [
    "NO_ROUTE",
    "UNKNOWN",
    "Clock",
    "Event",
    "Malformed",
    "Request",
    "derive_route",
    "parse_lines",
    "utc_iso",
]

# The route label of a path the proxy refused or that lies outside /api/v1/ (as in /metrics).
NO_ROUTE = "none"
# A name that is missing or not a string in the line.
UNKNOWN = "unknown"

# A `"event": "request"` line: Unix seconds, and its fields exactly as logged. Building an
# object per line would cost more than the JSON parsing; `tally` reads the few fields it needs.
Request = tuple[float, dict[str, Any]]


@dataclass(slots=True)
class Event:
    """Any other line: startup, token_reloaded, uvicorn's messages..."""

    at: float | None
    name: str
    old_fingerprint: str | None = None
    new_fingerprint: str | None = None


@dataclass(slots=True)
class Malformed:
    """Lines that are not JSON objects, or requests without a timestamp or status."""

    keep: int = 10
    count: int = 0
    first: list[tuple[str, int]] = field(default_factory=list)  # (source name, line number)

    def add(self, source: str, number: int) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append((source, number))


class Clock:
    """Unix seconds from ISO 8601 timestamps; naive ones are UTC, as the proxy writes UTC."""

    def __init__(self) -> None:
        # UTC minute prefix ("2026-11-25T01:02") -> its Unix seconds; bounded by the log's span.
        self._minutes: dict[str, float] = {}

    def seconds(self, stamp: object) -> float | None:
        # The proxy writes "2026-11-25T01:02:03.456789Z": with the minute known, only the
        # seconds are left to read. Offsets ("+08:00") make float() fail and take the long way.
        try:
            return self._minutes[stamp[:16]] + float(stamp[17:-1])  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            return self._parse(stamp)

    def _parse(self, stamp: object) -> float | None:
        if type(stamp) is not str:
            return None
        try:
            moment = datetime.fromisoformat(stamp)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        at = moment.timestamp()
        if moment.utcoffset() == timedelta(0) and stamp[16:17] == ":":
            self._minutes[stamp[:16]] = at - moment.second - moment.microsecond / 1e6
        return at


def utc_iso(at: float, timespec: str = "seconds") -> str:
    """Unix seconds as the log writes them: ISO 8601 in UTC with a `Z`."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def derive_route(path: object) -> str:
    """The route of a line written before `route` was logged, as the proxy would label it."""
    if type(path) is not str:
        return NO_ROUTE
    try:
        return route_template(parse_target(path.encode("latin-1", "replace")).segments)
    except ProxyError:
        return NO_ROUTE


def _event(fields: dict[str, Any], at: float | None) -> Event:
    name = fields.get("event")
    name = name if type(name) is str else UNKNOWN
    if name != "token_reloaded":
        return Event(at, name)
    old, new = fields.get("old_fingerprint"), fields.get("new_fingerprint")
    return Event(
        at,
        name,
        old_fingerprint=old if type(old) is str else None,
        new_fingerprint=new if type(new) is str else None,
    )


def parse_lines(
    lines: Iterable[tuple[str, Iterable[bytes]]], malformed: Malformed
) -> Iterator[Request | Event]:
    """Requests and events from each source's lines; the rest is counted in `malformed`.

    `lines` gives each source's name and its lines. Blank lines carry nothing and are skipped.
    """
    seconds = Clock().seconds
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    for source, stream in lines:
        try:
            for number, line in enumerate(stream, 1):
                try:
                    fields = loads(line)
                except decode_error:
                    if not line.isspace():
                        malformed.add(source, number)
                    continue
                if type(fields) is not dict:
                    malformed.add(source, number)
                    continue
                at = seconds(fields.get("timestamp"))
                if fields.get("event") != "request":
                    yield _event(fields, at)
                elif at is None or type(fields.get("status")) is not int:
                    malformed.add(source, number)
                else:
                    yield at, fields
        except READ_ERRORS as error:
            raise unreadable(source, error) from None
