"""`invoisx-proxy audit`: a report of token usage from the proxy's JSON-lines log.

One hand-written log (`LOG` below) has every case in it, and the tests assert the exact counts
and findings it must give, in the three output formats, in-process and as a real subprocess.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from proxy.report import (
    CSV_COLUMNS,
    JSON_KEYS,
    AuditError,
    audit_options,
    build_report,
    report_dict,
    run_audit,
)
from proxy.report.options import parse_moment
from proxy.report.source import open_sources, progress, source_lines
from proxy.report.tally import BusiestMinutes
from tests.conftest import subprocess_env

COMMAND = [sys.executable, "-m", "proxy", "audit"]
OLD, NEW = "aaaaaaaaaaaa", "bbbbbbbbbbbb"  # token fingerprints, before and after a rotation

# The window of most tests: the whole of 25 November 2026 in Malaysia (UTC+8), which is
# 2026-11-24T16:00Z to 2026-11-25T16:00Z. Business hours, 08:00-18:00 Malaysia time on that
# Wednesday, are 00:00-10:00 UTC.
WINDOW = ["--since", "2026-11-25", "--until", "2026-11-25"]


def at(day: int, hour: int, minute: int, second: int = 0) -> str:
    return f"2026-11-{day}T{hour:02}:{minute:02}:{second:02}.250000Z"


def request(
    when: str,
    request_id: str,
    client: str,
    method: str,
    route: str,
    *,
    status: int = 200,
    decision: str = "forwarded",
    error_code: str | None = None,
    fingerprint: str = NEW,
    idempotency: str | None = None,
) -> str:
    line = {
        "timestamp": when,
        "level": "info",
        "event": "request",
        "request_id": request_id,
        "client": client,
        "peer": "127.0.0.1",
        "method": method,
        "path": "/api/v1" + route.replace("{id}", "7a0b1c2d"),
        "route": route,
        "query_keys": [],
        "status": status,
        "decision": decision,
        "required_permission": "read",
        "error_code": error_code,
        "duration_ms": 1.5,
        "upstream_ms": 1.2,
        "bytes_in": 0,
        "bytes_out": 10,
        "token_fingerprint": fingerprint,
        "idempotency": idempotency,
    }
    return json.dumps(line)


def older_request(when: str, request_id: str, path: str, status: int, decision: str) -> str:
    """A line from before `route` and `peer` were logged: `client` held the peer address."""
    line = {
        "timestamp": when,
        "level": "info",
        "event": "request",
        "request_id": request_id,
        "client": "127.0.0.1",
        "method": "GET",
        "path": path,
        "query_keys": [],
        "status": status,
        "decision": decision,
        "error_code": None if status < 400 else "NOT_FOUND",
        "token_fingerprint": NEW,
    }
    return json.dumps(line)


def event(when: str, name: str, **fields: str) -> str:
    return json.dumps({"timestamp": when, "level": "info", "event": name, **fields})


def build_log() -> list[str]:
    lines = [
        # 1-4: before the window; they only teach which clients and tokens are known.
        event(at(24, 1, 59), "startup"),
        request(at(24, 2, 0), "old-1", "erp", "GET", "/buyers", fingerprint=OLD),
        request(at(24, 2, 1), "old-2", "erp", "GET", "/buyers", fingerprint=OLD),
        request(at(24, 2, 2), "old-3", "batch", "GET", "/buyers", fingerprint=OLD),
        # 5-10: malformed, except the blank line 6.
        "not json",
        "",
        "[1, 2]",
        json.dumps({"timestamp": at(25, 0, 1), "event": "request", "client": "erp"}),
        json.dumps({"event": "request", "client": "erp", "status": 200}),
        '{"timestamp": "2026-11-25T00:00:00Z", "event": "requ',
        # The window. Events are counted by name.
        event(at(25, 0, 30), "startup"),
        event(at(25, 0, 30), "Uvicorn running on http://127.0.0.1:8080 (Press CTRL+C to quit)"),
    ]
    # erp, with the old token until the rotation at 01:00.
    lines += [
        request(at(25, 0, 40, i), f"erp-{i + 1}", "erp", "GET", "/buyers", fingerprint=OLD)
        for i in range(5)
    ]
    lines.append(event(at(25, 1, 0), "token_reloaded", old_fingerprint=OLD, new_fingerprint=NEW))
    lines += [
        request(at(25, 1, 10, i), f"erp-{i + 6}", "erp", "GET", "/buyers/{id}") for i in range(3)
    ]
    # InvoisX refuses the token twice (high) and one call's permission once (not the token);
    # the proxy refuses one call as the token's declared expiry has passed.
    lines += [
        request(
            at(25, 1, 20),
            "erp-auth-1",
            "erp",
            "POST",
            "/invoices",
            status=401,
            error_code="UNAUTHORIZED",
        ),
        request(
            at(25, 1, 20, 1),
            "erp-auth-2",
            "erp",
            "POST",
            "/invoices",
            status=403,
            error_code="COMPANY_ACCESS_DENIED",
        ),
        request(
            at(25, 1, 21),
            "erp-forbidden",
            "erp",
            "GET",
            "/buyers",
            status=403,
            error_code="FORBIDDEN",
        ),
        request(
            at(25, 1, 22),
            "erp-expired",
            "erp",
            "GET",
            "/buyers",
            status=401,
            decision="expired",
            error_code="TOKEN_EXPIRED",
        ),
        request(at(25, 1, 30), "erp-delete", "erp", "DELETE", "/buyers/{id}", status=204),
        request(at(25, 1, 31), "erp-cancel", "erp", "POST", "/invoices/{id}/cancel"),
    ]
    # batch: one call a minute for ten minutes, then 40 in one minute (a burst).
    lines += [
        request(at(25, 2, minute), f"batch-m{minute}", "batch", "GET", "/buyers")
        for minute in range(10)
    ]
    lines += [
        request(at(25, 2, 10, second), f"batch-b{second}", "batch", "GET", "/buyers")
        for second in range(40)
    ]
    # portal, a client never seen before: ten DELETEs the proxy refuses.
    lines += [
        request(
            at(25, 3, 0, i),
            f"portal-{i + 1}",
            "portal",
            "DELETE",
            "/buyers/{id}",
            status=403,
            decision="denied",
            error_code="FORBIDDEN",
        )
        for i in range(10)
    ]
    lines += [
        older_request(at(25, 4, 0), "older-1", "/api/v1/buyers/abc", 200, "forwarded"),
        older_request(at(25, 4, 1), "older-2", "/health", 404, "invalid"),
        request(at(25, 5, 0), "erp-odd", "erp", "GET", "/buyers", decision="shadowed"),
        # 20:00 in Malaysia: outside business hours.
        request(at(25, 12, 0), "erp-late", "erp", "GET", "/buyers"),
        # 2026-11-26 00:00 in Malaysia: the first instant after the window.
        request("2026-11-25T16:00:00Z", "erp-after", "erp", "GET", "/buyers"),
    ]
    return lines


LOG = "\n".join(build_log()) + "\n"
NEW_IDS = [
    *(f"erp-{n}" for n in range(6, 9)),
    "erp-auth-1",
    "erp-auth-2",
    "erp-forbidden",
    "erp-expired",
    "erp-delete",
    "erp-cancel",
    *(f"batch-m{minute}" for minute in range(10)),
    "batch-b0",
]


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.log"
    path.write_text(LOG)
    return path


def report_of(path: Path, *args: str) -> dict[str, Any]:
    """The JSON report, built in-process with the CLI's option parsing."""
    options = dict(zip(args[::2], args[1::2], strict=True))
    built = audit_options(
        since=options.get("--since"),
        until=options.get("--until"),
        fail_on=options.get("--fail-on", "high"),
    )
    report = build_report(source_lines(open_sources([str(path)])), built)
    return report_dict(report)


EXPECTED_CLIENTS = {
    "127.0.0.1": {
        "requests": 2,
        "denied": 0,
        "expired": 0,
        "invalid": 1,
        "auth_failures": 0,
        "errors": 1,
        "first_seen": "2026-11-25T04:00:00.250000Z",
        "last_seen": "2026-11-25T04:01:00.250000Z",
    },
    "batch": {
        "requests": 50,
        "denied": 0,
        "expired": 0,
        "invalid": 0,
        "auth_failures": 0,
        "errors": 0,
        "first_seen": "2026-11-25T02:00:00.250000Z",
        "last_seen": "2026-11-25T02:10:39.250000Z",
    },
    "erp": {
        "requests": 16,
        "denied": 0,
        "expired": 1,
        "invalid": 0,
        "auth_failures": 2,
        "errors": 4,
        "first_seen": "2026-11-25T00:40:00.250000Z",
        "last_seen": "2026-11-25T12:00:00.250000Z",
    },
    "portal": {
        "requests": 10,
        "denied": 10,
        "expired": 0,
        "invalid": 0,
        "auth_failures": 0,
        "errors": 10,
        "first_seen": "2026-11-25T03:00:00.250000Z",
        "last_seen": "2026-11-25T03:00:09.250000Z",
    },
}


def test_json_report_has_the_exact_counts(log_file: Path) -> None:
    report = report_of(log_file, *WINDOW)
    assert tuple(report) == JSON_KEYS
    assert report["window"] == {
        "since": "2026-11-24T16:00:00.000000Z",
        "until": "2026-11-25T16:00:00.000000Z",
        "first_request": "2026-11-25T00:40:00.250000Z",
        "last_request": "2026-11-25T12:00:00.250000Z",
        "requests_before": 3,
        "requests_after": 1,
        "events": {
            "Uvicorn running on http://127.0.0.1:8080 (Press CTRL+C to quit)": 1,
            "startup": 1,
            "token_reloaded": 1,
        },
    }
    assert report["total"] == 78
    assert report["by_client"] == EXPECTED_CLIENTS
    assert report["by_route"] == {
        "GET /buyers": 59,
        "DELETE /buyers/{id}": 11,
        "GET /buyers/{id}": 4,
        "POST /invoices": 2,
        "POST /invoices/{id}/cancel": 1,
        "GET none": 1,
    }
    assert report["by_status"] == {"200": 62, "204": 1, "401": 2, "403": 12, "404": 1}
    assert report["decisions"] == {
        "forwarded": 65,
        "denied": 10,
        "expired": 1,
        "invalid": 1,
        "shadowed": 1,
    }
    assert report["fingerprints"] == {
        OLD: {
            "first_used": "2026-11-25T00:40:00.250000Z",
            "last_used": "2026-11-25T00:40:04.250000Z",
            "requests": 5,
            "replaced_at": "2026-11-25T01:00:00.250000Z",
        },
        NEW: {
            "first_used": "2026-11-25T01:10:00.250000Z",
            "last_used": "2026-11-25T12:00:00.250000Z",
            "requests": 73,
            "replaced_at": None,
        },
    }
    assert report["malformed_lines"] == {
        "count": 5,
        "first_line_numbers": [5, 7, 8, 9, 10],
        "first_locations": [f"{log_file}:{n}" for n in (5, 7, 8, 9, 10)],
    }


def test_findings_are_exact_and_most_severe_first(log_file: Path) -> None:
    findings = report_of(log_file, *WINDOW)["findings"]
    summary = [
        (f["severity"], f["kind"], f["client"], f["fingerprint"], f["evidence_count"])
        for f in findings
    ]
    assert summary == [
        ("high", "auth_failure", None, NEW, 2),
        ("medium", "new_client", "127.0.0.1", None, 2),
        ("medium", "new_client", "portal", None, 10),
        ("medium", "burst", "batch", None, 40),
        ("medium", "repeated_refusals", "portal", None, 10),
        ("medium", "delete", "erp", None, 1),
        ("medium", "cancel", "erp", None, 1),
        ("low", "new_fingerprint", None, NEW, 73),
        ("low", "delete", "portal", None, 10),
        ("low", "outside_hours", "erp", None, 1),
    ]
    ids = [f["request_ids"] for f in findings]
    assert ids[0] == ["erp-auth-1", "erp-auth-2"]
    assert ids[1] == ["older-1", "older-2"]
    assert ids[2] == [f"portal-{n}" for n in range(1, 11)]
    # A minute's ids are kept from the burst floor (30 requests) on: the 30th to the 40th.
    assert ids[3] == [f"batch-b{second}" for second in range(29, 40)]
    assert ids[4] == ids[2] == ids[8]
    assert (ids[5], ids[6], ids[9]) == (["erp-delete"], ["erp-cancel"], ["erp-late"])
    assert ids[7] == NEW_IDS  # capped at 20 of 73
    messages = [f["message"] for f in findings]
    assert (
        "InvoisX refused token bbbbbbbbbbbb 2 times (UNAUTHORIZED 1, COMPANY_ACCESS_DENIED 1)"
        in messages[0]
    )
    assert (
        "1 minute with at least 30 requests against a median of 1 per active minute" in messages[3]
    )
    assert "40 at 2026-11-25T02:10:00Z" in messages[3]
    assert "denied 10, expired 0, invalid 0" in messages[4]
    assert "1 carried out by InvoisX" in messages[5]
    assert "loaded by a rotation at 2026-11-25T01:00:00Z" in messages[7]
    assert "10 DELETE calls, 0 carried out" in messages[8]
    assert "08:00-18:00 mon-fri Asia/Kuala_Lumpur" in messages[9]


def test_without_since_nothing_is_new_and_everything_counts(log_file: Path) -> None:
    report = report_of(log_file)
    assert report["total"] == 3 + 78 + 1
    assert report["window"]["since"] is None and report["window"]["requests_before"] == 0
    assert report["window"]["events"]["startup"] == 2
    kinds = [finding["kind"] for finding in report["findings"]]
    assert "new_client" not in kinds and "new_fingerprint" not in kinds
    assert report["fingerprints"][OLD]["requests"] == 3 + 5


def test_a_naive_window_is_malaysia_time_and_until_is_exclusive(log_file: Path) -> None:
    # 10:00 to 10:10 Malaysia time: batch's ten quiet minutes; the burst at 10:10 is left out.
    report = report_of(log_file, "--since", "2026-11-25T10:00", "--until", "2026-11-25 10:10")
    assert report["total"] == 10
    assert report["by_client"]["batch"]["requests"] == 10
    assert report["window"]["requests_before"] == 3 + 14
    assert report["window"]["requests_after"] == 40 + 10 + 2 + 1 + 1 + 1
    assert report["window"]["events"] == {}


def test_a_window_with_an_explicit_offset_is_honoured(log_file: Path) -> None:
    report = report_of(log_file, "--since", "2026-11-25T02:10:00Z", "--until", "2026-11-25T02:11Z")
    assert report["total"] == 40
    assert report["findings"] == []  # 40 is the median of batch's only active minute


def test_a_window_past_every_line_is_empty(log_file: Path) -> None:
    assert report_of(log_file, "--since", "2027-01-01")["total"] == 0


def test_relative_and_absolute_moments() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert parse_moment("24h", now=now) == datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    assert parse_moment("7d", now=now) == datetime(2026, 11, 18, 12, 0, tzinfo=UTC)
    assert parse_moment("30m", now=now) == datetime(2026, 11, 25, 11, 30, tzinfo=UTC)
    assert parse_moment("2026-11-25", now=now) == datetime(2026, 11, 24, 16, 0, tzinfo=UTC)
    end = parse_moment("2026-11-25", now=now, end_of_day=True)
    assert end == datetime(2026, 11, 25, 16, 0, tzinfo=UTC)
    assert parse_moment("2026-11-25T09:30", now=now) == datetime(2026, 11, 25, 1, 30, tzinfo=UTC)
    assert parse_moment("2026-11-25T09:30Z", now=now) == datetime(2026, 11, 25, 9, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"since": "yesterday"}, "--since: 'yesterday' is not an ISO date or datetime"),
        ({"until": "12x"}, "--until: '12x' is not an ISO date or datetime"),
        ({"since": "2026-11-26", "until": "2026-11-25"}, "--until: must be later than --since"),
        ({"business_hours": "18:00-08:00"}, "--business-hours: '18:00-08:00' is not a span"),
        ({"business_hours": "8-18"}, "--business-hours: '8-18' is not a span"),
        ({"business_days": "mon-fry"}, "--business-days: 'fry' is not a day"),
        ({"timezone": "Mars/Olympus"}, "--timezone: unknown time zone 'Mars/Olympus'"),
        ({"burst_min": 0}, "must be positive"),
        ({"fail_on": "critical"}, "--fail-on: choose one of low, medium, high, none"),
    ],
)
def test_bad_options_name_the_problem(options: dict[str, Any], message: str) -> None:
    with pytest.raises(AuditError) as caught:
        audit_options(**options)
    assert message in str(caught.value)


def test_business_days_and_hours_options(log_file: Path) -> None:
    # Every day, 09:00-12:00 in Kuala Lumpur (01:00-04:00 UTC): erp's first calls at 00:40
    # UTC, the older lines at 04:00, and erp's calls at 05:00, 12:00 and 16:00 are outside.
    options = audit_options(
        since="2026-11-25",
        business_hours="09:00-12:00",
        business_days="sun-sat",
        timezone="Asia/Kuala_Lumpur",
    )
    report = build_report(source_lines(open_sources([str(log_file)])), options)
    outside = [f for f in report.findings if f.kind == "outside_hours"]
    assert [(f.client, f.evidence_count) for f in outside] == [("127.0.0.1", 2), ("erp", 8)]
    assert outside[1].request_ids == (
        "erp-1",
        "erp-2",
        "erp-3",
        "erp-4",
        "erp-5",
        "erp-odd",
        "erp-late",
        "erp-after",
    )
    assert audit_options(business_days="mon,wed-thu").hours.days == frozenset({0, 2, 3})
    assert audit_options(business_days="fri-mon").hours.days == frozenset({4, 5, 6, 0})


def test_csv_has_one_row_per_client_and_route(log_file: Path) -> None:
    out = io.StringIO()
    options = audit_options(since="2026-11-25", until="2026-11-25", output="csv")
    assert run_audit([str(log_file)], options, stdout=out) == 1
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [row[:8] for row in rows[1:]] == [
        ["127.0.0.1", "GET", "/buyers/{id}", "1", "0", "0", "0", "0"],
        ["127.0.0.1", "GET", "none", "1", "0", "0", "0", "1"],
        ["batch", "GET", "/buyers", "50", "0", "0", "0", "0"],
        ["erp", "GET", "/buyers", "9", "0", "1", "0", "2"],
        ["erp", "DELETE", "/buyers/{id}", "1", "0", "0", "0", "0"],
        ["erp", "GET", "/buyers/{id}", "3", "0", "0", "0", "0"],
        ["erp", "POST", "/invoices", "2", "0", "0", "2", "2"],
        ["erp", "POST", "/invoices/{id}/cancel", "1", "0", "0", "0", "0"],
        ["portal", "DELETE", "/buyers/{id}", "10", "10", "0", "0", "10"],
    ]
    assert rows[4][8:] == ["2026-11-25T00:40:00.250000Z", "2026-11-25T12:00:00.250000Z"]


def test_text_report_reads_top_down(log_file: Path) -> None:
    out = io.StringIO()
    options = audit_options(since="2026-11-25", until="2026-11-25")
    assert run_audit([str(log_file)], options, stdout=out) == 1
    text = out.getvalue()
    assert text.startswith(
        "InvoisX proxy audit: 78 requests from 4 clients, "
        "2026-11-24T16:00:00Z to 2026-11-25T16:00:00Z (times in UTC)\n"
    )
    assert "  before the window: 3 requests, read to learn the known clients and tokens\n" in text
    assert "  after the window: 1 request\n" in text
    assert f"  skipped: 5 malformed lines (first: {log_file}:5, {log_file}:7," in text
    assert "Findings: 1 high, 6 medium, 3 low\n" in text
    assert "  HIGH    auth_failure       InvoisX refused token bbbbbbbbbbbb 2 times" in text
    assert "2 lines: erp-auth-1, erp-auth-2\n" in text
    assert "73 lines: erp-6, erp-7, erp-8, erp-auth-1, erp-auth-2 and 68 more\n" in text
    clients = text.split("\nClients\n")[1].split("\n\n")[0].splitlines()
    assert clients[0].split() == [
        "client",
        "requests",
        "denied",
        "expired",
        "invalid",
        "auth",
        "fail",
        "errors",
        "first",
        "seen",
        "last",
        "seen",
    ]
    assert clients[1].split()[:7] == ["batch", "50", "0", "0", "0", "0", "0"]
    assert clients[2].split()[:7] == ["erp", "16", "0", "1", "0", "2", "4"]
    assert "Statuses: 200 62, 204 1, 401 2, 403 12, 404 1\n" in text
    assert "Decisions: forwarded 65, denied 10, expired 1, invalid 1, shadowed 1\n" in text
    tokens = text.split("\nToken fingerprints\n")[1].splitlines()
    assert tokens[1].split() == [
        OLD,
        "5",
        "2026-11-25T00:40:00Z",
        "2026-11-25T00:40:04Z",
        "2026-11-25T01:00:00Z",
    ]


@pytest.mark.parametrize(
    ("fail_on", "window", "status"),
    [
        ("high", WINDOW, 1),  # the auth failures
        ("none", WINDOW, 0),
        # 00:00-09:15 Malaysia time: erp's first eight calls, and the new token (low) only.
        ("high", ["--since", "2026-11-25", "--until", "2026-11-25T09:15"], 0),
        ("medium", ["--since", "2026-11-25", "--until", "2026-11-25T09:15"], 0),
        ("low", ["--since", "2026-11-25", "--until", "2026-11-25T09:15"], 1),
    ],
)
def test_exit_status_follows_fail_on(
    log_file: Path, fail_on: str, window: list[str], status: int
) -> None:
    result = subprocess.run(
        [*COMMAND, str(log_file), *window, "--fail-on", fail_on, "--format", "json"],
        env=subprocess_env(),
        capture_output=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (status, b"")


def test_cli_subprocess_json_equals_the_in_process_report(log_file: Path) -> None:
    result = subprocess.run(
        [*COMMAND, str(log_file), *WINDOW, "--format", "json"],
        env=subprocess_env(),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == b""  # no progress in a pipe
    assert json.loads(result.stdout) == report_of(log_file, *WINDOW)


def test_cli_reads_stdin_plain_or_gzip(tmp_path: Path) -> None:
    for data in (LOG.encode(), gzip.compress(LOG.encode())):
        result = subprocess.run(
            [*COMMAND, *WINDOW, "--format", "csv"],
            input=data,
            env=subprocess_env(),
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 1
        rows = list(csv.reader(io.StringIO(result.stdout.decode())))
        assert len(rows) == 1 + 9
        assert sum(int(row[3]) for row in rows[1:]) == 78


def test_gzip_files_and_several_inputs(log_file: Path, tmp_path: Path) -> None:
    packed = tmp_path / "audit.log.1.gz"
    packed.write_bytes(gzip.compress(LOG.encode()))
    out = io.StringIO()
    options = audit_options(output="json", fail_on="none")
    assert run_audit([str(packed), str(log_file)], options, stdout=out) == 0
    report = json.loads(out.getvalue())
    assert report["total"] == 2 * 82
    assert report["malformed_lines"]["count"] == 10
    assert report["malformed_lines"]["first_locations"][5] == f"{log_file}:5"


def test_unreadable_input_exits_2_with_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.log.gz"
    broken.write_bytes(gzip.compress(LOG.encode())[:200])
    for path, line in [
        ("/nonexistent/audit.log", "cannot read /nonexistent/audit.log: No such file or directory"),
        (str(tmp_path), f"cannot read {tmp_path}: Is a directory"),
        (str(broken), f"cannot read {broken}: "),
    ]:
        result = subprocess.run(
            [*COMMAND, path], env=subprocess_env(), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.startswith(f"invoisx-proxy: audit: {line}")
        assert result.stderr.count("\n") == 1


def test_bad_option_exits_2_with_one_line(log_file: Path) -> None:
    result = subprocess.run(
        [*COMMAND, str(log_file), "--since", "last tuesday"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "invoisx-proxy: audit: --since: 'last tuesday' is not an ISO date or datetime, "
        "nor an age such as 24h or 7d\n"
    )


def test_odd_values_never_stop_the_report(tmp_path: Path) -> None:
    lines = [
        request(at(25, 1, 0), "ok", "erp", "GET", "/buyers"),
        # Names that are not strings, a list where a route belongs, a status as text.
        json.dumps(
            {
                "timestamp": at(25, 1, 1),
                "event": "request",
                "status": 400,
                "client": 7,
                "method": ["GET"],
                "route": {"a": 1},
            }
        ),
        json.dumps({"timestamp": at(25, 1, 2), "event": "request", "status": "200"}),
        json.dumps({"timestamp": "yesterday", "event": "request", "status": 200}),
        json.dumps(
            {
                "timestamp": "2026-11-25T09:01:03+08:00",
                "event": "request",
                "status": 201,
                "client": "erp",
                "token_fingerprint": 5,
            }
        ),
        json.dumps({"event": "shutdown"}),
        "\x00\xff garbage",
    ]
    path = tmp_path / "odd.log"
    path.write_text("\n".join(lines))
    report = report_of(path)
    assert report["total"] == 3
    assert report["by_client"]["unknown"]["requests"] == report["by_status"]["400"] == 1
    assert report["by_client"]["unknown"]["errors"] == 1
    assert report["by_client"]["erp"]["first_seen"] == "2026-11-25T01:00:00.250000Z"
    assert report["by_client"]["erp"]["last_seen"] == "2026-11-25T01:01:03.000000Z"
    assert report["by_route"] == {"GET /buyers": 1, "unknown unknown": 1, "unknown none": 1}
    assert report["malformed_lines"]["first_line_numbers"] == [3, 4, 7]
    assert report["window"]["events"] == {"shutdown": 1}
    assert list(report["fingerprints"]) == [NEW]


def test_busiest_minutes_keep_the_ids_of_the_busiest_only() -> None:
    busiest = BusiestMinutes(cap=2)
    counts: dict[float, int] = {}
    for minute, requests in [(1.0, 3), (2.0, 5), (3.0, 4), (4.0, 2)]:
        for n in range(requests):
            counts[minute] = counts.get(minute, 0) + 1
            busiest.note(minute, f"{minute:g}-{n}", counts)
    # Minute 3 took minute 1's place once it had more requests: from its 4th on.
    assert busiest.ids == {2.0: ["2-0", "2-1"], 3.0: ["3-3"]}


def test_progress_counts_lines_across_sources_only_when_large() -> None:
    terminal = io.StringIO()
    sources = [("a.log", [b"{}\n"] * 150_000), ("b.log", [b"{}\n"] * 100_000)]
    lines = [line for _, stream in progress(sources, terminal) for line in stream]
    assert len(lines) == 250_000
    assert terminal.getvalue() == "\raudit: 200,000 lines read\raudit: 250,000 lines read\n"
    small = io.StringIO()
    assert [len(list(stream)) for _, stream in progress([("c.log", [b"{}\n"] * 10)], small)] == [10]
    assert small.getvalue() == ""


def _text_report(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "audit.log"
    path.write_text("".join(f"{line}\n" for line in lines))
    out = io.StringIO()
    assert run_audit([str(path)], audit_options(fail_on="none"), stdout=out) == 0
    return out.getvalue()


def _sections(text: str) -> dict[str, list[str]]:
    """The text report's sections by their first word, each as its lines."""
    return {block.split()[0]: block.splitlines() for block in text.strip().split("\n\n")}


def test_an_empty_section_says_none_rather_than_printing_a_bare_header(tmp_path: Path) -> None:
    text = _text_report(tmp_path, [event(at(25, 1, 0), "startup")])
    sections = _sections(text)
    assert sections["Findings:"] == ["Findings: none"]
    assert sections["Clients:"] == ["Clients: none"]
    assert sections["Routes:"] == ["Routes: none"]
    assert sections["Statuses:"] == [
        "Statuses: none",
        "Decisions: none",
        "Other events: startup 1",
    ]
    assert sections["Token"] == ["Token fingerprints: none"]


def test_a_quiet_log_lists_what_it_has_and_says_none_for_the_rest(tmp_path: Path) -> None:
    # Two forwarded calls during business hours: no refusal, no event, no finding.
    calls = [
        request(at(25, 2, minute), f"erp-{minute}", "erp", "GET", "/buyers") for minute in (1, 2)
    ]
    sections = _sections(_text_report(tmp_path, calls))
    assert sections["Findings:"] == ["Findings: none"]
    assert sections["Clients"][0] == "Clients"
    assert sections["Clients"][2].split()[:3] == ["erp", "2", "0"]
    assert sections["Statuses:"] == [
        "Statuses: 200 2",
        "Decisions: forwarded 2",
        "Other events: none",
    ]
    assert sections["Token"][0] == "Token fingerprints"
    assert sections["Token"][2].split()[:2] == [NEW, "2"]


def test_calls_whose_outcome_is_unknown_are_a_high_finding_listing_them(tmp_path: Path) -> None:
    submit = "/invoices/{id}/submit"
    lines = [
        request(
            at(25, 9, 0),
            "lost-1",
            "billing",
            "POST",
            submit,
            status=504,
            decision="upstream_error",
            error_code="UPSTREAM_TIMEOUT",
            idempotency="unknown",
        ),
        request(
            at(25, 9, 1),
            "lost-2",
            "billing",
            "POST",
            submit,
            status=503,
            decision="aborted",
            error_code="PROXY_SHUTTING_DOWN",
            idempotency="unknown",
        ),
        # The repeats refused for them, and a call that went well, are not findings.
        request(
            at(25, 9, 2),
            "repeat",
            "billing",
            "POST",
            submit,
            status=409,
            decision="replayed",
            error_code="IDEMPOTENCY_OUTCOME_UNKNOWN",
            idempotency="unknown",
        ),
        request(at(25, 9, 3), "fine", "billing", "POST", submit, status=201, idempotency="kept"),
    ]
    path = tmp_path / "audit.log"
    path.write_text("".join(f"{line}\n" for line in lines))
    findings = report_of(path)["findings"]
    (lost,) = [finding for finding in findings if finding["kind"] == "outcome_unknown"]
    assert lost["severity"] == "high" and lost["client"] == "billing"
    assert lost["request_ids"] == ["lost-1", "lost-2"] and lost["evidence_count"] == 2
    assert findings[0] == lost  # first among the high ones
    assert "look these documents up in InvoisX" in lost["message"]
