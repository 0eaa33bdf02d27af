"""`invoisx-proxy audit`: open the inputs, build the report, print it, choose the exit status."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO, TextIO

from proxy.report.build import build_report
from proxy.report.options import AuditOptions
from proxy.report.render import render
from proxy.report.source import open_sources, progress, source_lines

__all__ = ["run_audit"]


def run_audit(
    paths: Sequence[str],
    options: AuditOptions,
    *,
    stdin: BinaryIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Report on the logs at `paths` (stdin when empty); 1 when a finding reaches `--fail-on`.

    Raises `AuditError` for an unreadable input.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    lines: Iterator[tuple[str, Iterable[bytes]]] = source_lines(open_sources(paths, stdin))
    # Progress is for a person watching a large file, never for a pipe or a test.
    if stderr.isatty():
        lines = progress(lines, stderr)
    report = build_report(lines, options)
    try:
        stdout.write(render(report))
        stdout.flush()
    except BrokenPipeError:
        # The reader (head, less) left early; that is no failure of the report. Python would
        # report the pipe again when it flushes stdout at exit, so point stdout elsewhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
    return 1 if report.failed else 0
