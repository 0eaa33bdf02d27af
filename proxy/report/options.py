"""What `invoisx-proxy audit` was asked for, read from the operator's strings once.

Every option is validated here, before any input is read, so a typo costs one line on stderr
and exit status 2 rather than a report over the wrong window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.config.settings import MALAYSIA_TIME

__all__ = [
    "FAIL_ON",
    "FORMATS",
    "AuditError",
    "AuditOptions",
    "BusinessHours",
    "OutputFormat",
    "Severity",
    "Thresholds",
    "Window",
    "audit_options",
    "parse_moment",
]

Severity = Literal["low", "medium", "high"]
OutputFormat = Literal["text", "json", "csv"]
FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)
FAIL_ON: tuple[str, ...] = (*get_args(Severity), "none")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WHOLE_DAY = 24 * 60


class AuditError(Exception):
    """A bad option or an unreadable input; `str()` is the one line shown to the operator."""


@dataclass(frozen=True, slots=True)
class Window:
    """The span of time reported on: `since` inclusive, `until` exclusive, as Unix seconds."""

    since: float | None = None
    until: float | None = None

    def before(self, at: float) -> bool:
        return self.since is not None and at < self.since

    def after(self, at: float) -> bool:
        return self.until is not None and at >= self.until


@dataclass(frozen=True, slots=True)
class BusinessHours:
    """When calls are expected: minutes after local midnight `[start, end)` on `days`."""

    start: int = 8 * 60
    end: int = 18 * 60
    days: frozenset[int] = frozenset(range(5))  # date.weekday(): Monday is 0
    zone: tzinfo = field(default_factory=lambda: ZoneInfo("Asia/Kuala_Lumpur"))
    label: str = "08:00-18:00 mon-fri Asia/Kuala_Lumpur"

    def contains(self, at: float) -> bool:
        local = datetime.fromtimestamp(at, self.zone)
        minute = local.hour * 60 + local.minute
        return local.weekday() in self.days and self.start <= minute < self.end


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a pattern becomes a finding; each is a command-line option."""

    burst_factor: float = 5.0  # a minute this many times the client's median per active minute
    burst_min: int = 30  # ...and at least this many requests in it
    refusals: int = 10  # denied, expired or invalid calls from one client in the window


@dataclass(frozen=True, slots=True)
class AuditOptions:
    """Everything a report depends on besides its input."""

    window: Window = Window()
    hours: BusinessHours = field(default_factory=BusinessHours)
    thresholds: Thresholds = Thresholds()
    output: OutputFormat = "text"
    fail_on: Severity | None = "high"
    evidence_cap: int = 20  # request ids kept per finding


def parse_moment(value: str, *, now: datetime, end_of_day: bool = False) -> datetime:
    """`24h`/`7d` before `now`, or an ISO date or datetime; naive ones are Malaysia time.

    A bare date is the start of that day, or with `end_of_day` the start of the next one, so
    `--until 2026-11-30` includes the 30th.
    """
    value = value.strip()
    unit = _UNITS.get(value[-1:])
    if unit is not None and value[:-1].isdecimal():
        return now - timedelta(seconds=int(value[:-1]) * unit)
    try:
        day = date.fromisoformat(value) if len(value) == 10 else None
        moment = datetime.fromisoformat(value) if day is None else None
    except ValueError:
        raise AuditError(
            f"{value!r} is not an ISO date or datetime, nor an age such as 24h or 7d"
        ) from None
    if day is not None:
        return datetime.combine(day + timedelta(days=end_of_day), time(), MALAYSIA_TIME)
    assert moment is not None
    return moment if moment.tzinfo else moment.replace(tzinfo=MALAYSIA_TIME)


def _clock(value: str) -> int:
    hours, colon, minutes = value.partition(":")
    if not (colon and hours.isdecimal() and minutes.isdecimal() and len(minutes) == 2):
        raise ValueError(value)
    total = int(hours) * 60 + int(minutes)
    if int(minutes) >= 60 or total > _WHOLE_DAY:
        raise ValueError(value)
    return total


def _business_hours(value: str) -> tuple[int, int]:
    start, dash, end = value.partition("-")
    try:
        span = (_clock(start.strip()), _clock(end.strip()))
    except ValueError:
        span = (0, 0)
    if not dash or span[0] >= span[1]:
        raise AuditError(f"--business-hours: {value!r} is not a span such as 08:00-18:00")
    return span


def _day(name: str) -> int:
    try:
        return _DAYS.index(name.strip().lower()[:3])
    except ValueError:
        raise AuditError(f"--business-days: {name.strip()!r} is not a day (mon ... sun)") from None


def _business_days(value: str) -> frozenset[int]:
    """`mon-fri`, `sun-thu`, `mon,wed,fri` or a mix; a range may wrap past Sunday."""
    days: set[int] = set()
    for item in value.split(","):
        first, dash, last = item.partition("-")
        start = _day(first)
        stop = _day(last) if dash else start
        days.update((start + offset) % 7 for offset in range((stop - start) % 7 + 1))
    return frozenset(days)


def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise AuditError(f"--timezone: unknown time zone {name!r}") from None


def _window(since: str | None, until: str | None, now: datetime) -> Window:
    def moment(option: str, value: str | None, end_of_day: bool) -> float | None:
        if value is None:
            return None
        try:
            return parse_moment(value, now=now, end_of_day=end_of_day).timestamp()
        except AuditError as error:
            raise AuditError(f"{option}: {error}") from None

    window = Window(moment("--since", since, False), moment("--until", until, True))
    if window.since is not None and window.until is not None and window.since >= window.until:
        raise AuditError("--until: must be later than --since")
    return window


def audit_options(
    *,
    since: str | None = None,
    until: str | None = None,
    business_hours: str = "08:00-18:00",
    business_days: str = "mon-fri",
    timezone: str = "Asia/Kuala_Lumpur",
    burst_factor: float = 5.0,
    burst_min: int = 30,
    refusals: int = 10,
    output: str = "text",
    fail_on: str = "high",
    now: datetime | None = None,
) -> AuditOptions:
    """Options from the operator's strings; raises `AuditError` naming the bad one."""
    if output not in FORMATS:
        raise AuditError(f"--format: choose one of {', '.join(FORMATS)}")
    if fail_on not in FAIL_ON:
        raise AuditError(f"--fail-on: choose one of {', '.join(FAIL_ON)}")
    if burst_factor <= 0 or burst_min < 1 or refusals < 1:
        raise AuditError("--burst-factor, --burst-min and --refusals must be positive")
    start, end = _business_hours(business_hours)
    hours = BusinessHours(
        start=start,
        end=end,
        days=_business_days(business_days),
        zone=_zone(timezone),
        label=f"{business_hours} {business_days} {timezone}",
    )
    return AuditOptions(
        window=_window(since, until, now or datetime.now(UTC)),
        hours=hours,
        thresholds=Thresholds(burst_factor, burst_min, refusals),
        output=output,  # checked against FORMATS above
        fail_on=None if fail_on == "none" else fail_on,  # type: ignore[arg-type]
    )
