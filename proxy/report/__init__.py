"""Token usage audit from the proxy's JSON-lines log: `invoisx-proxy audit [LOG ...]`.

The log is streamed once through small steps, each in its own module:
`source` (files, gzip, stdin) -> `records` (parse a line) -> `build` (place it in the window)
-> `tally` (aggregate) -> `findings` (unusual activity) -> `render` (text, JSON, CSV).
`options` reads the command-line strings once; `command` runs it all.
"""

from proxy.report.build import Report, build_report
from proxy.report.command import run_audit
from proxy.report.findings import Finding
from proxy.report.options import FAIL_ON, FORMATS, AuditError, AuditOptions, audit_options
from proxy.report.render import CSV_COLUMNS, JSON_KEYS, render, report_dict

__all__ = [
    "CSV_COLUMNS",
    "FAIL_ON",
    "FORMATS",
    "JSON_KEYS",
    "AuditError",
    "AuditOptions",
    "Finding",
    "Report",
    "audit_options",
    "build_report",
    "render",
    "report_dict",
    "run_audit",
]
