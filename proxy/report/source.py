"""Input: log files (plain or gzip, told apart by their first bytes) or stdin, line by line."""

from __future__ import annotations

import gzip
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, BinaryIO, TextIO, cast

from proxy.report.options import AuditError

__all__ = [
    "PROGRESS_EVERY",
    "READ_ERRORS",
    "STDIN_NAME",
    "Source",
    "open_sources",
    "progress",
    "source_lines",
    "unreadable",
]

STDIN_NAME = "-"
# Progress is shown only on a terminal, and only once the input proves large.
PROGRESS_EVERY = 200_000
_GZIP_MAGIC = b"\x1f\x8b"
# What reading a log can raise: I/O errors, and a truncated or corrupt gzip stream.
READ_ERRORS = (OSError, EOFError, zlib.error)


@dataclass(frozen=True, slots=True)
class Source:
    """One input: the stream to read, the file under it (None for stdin, left open), a name."""

    name: str
    stream: IO[bytes]
    file: IO[bytes] | None

    def close(self) -> None:
        if self.file is not None:
            self.stream.close()
            self.file.close()  # a GzipFile does not close the file it was given


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def unreadable(name: str, error: BaseException) -> AuditError:
    """The one-line error for an input that failed while being read."""
    return AuditError(f"cannot read {name}: {_reason(error)}")


def _source(name: str, stream: BinaryIO, file: BinaryIO | None) -> Source:
    # peek() looks without consuming, so a pipe (stdin) can be sniffed too.
    head = stream.peek(2)[:2] if hasattr(stream, "peek") else b""
    if head == _GZIP_MAGIC:
        return Source(name, cast(IO[bytes], gzip.GzipFile(fileobj=stream, mode="rb")), file)
    return Source(name, stream, file)


def _stdin(given: BinaryIO | None) -> BinaryIO:
    if given is not None:
        return given
    if sys.stdin is None:  # started with stdin closed
        raise AuditError("cannot read stdin: it is closed")
    return sys.stdin.buffer


def open_sources(paths: Sequence[str], stdin: BinaryIO | None = None) -> list[Source]:
    """Open every input before reading any, so a bad path fails before output starts.

    No path, or `-`, is stdin (`sys.stdin` unless `stdin` is given).
    """
    sources: list[Source] = []
    for path in paths or [STDIN_NAME]:
        try:
            if path == STDIN_NAME:
                sources.append(_source(path, _stdin(stdin), None))
                continue
            file = open(path, "rb")  # noqa: SIM115  # closed by source_lines
            sources.append(_source(path, file, file))
        except OSError as error:
            for source in sources:
                source.close()
            raise unreadable(path, error) from None
    return sources


def source_lines(sources: Sequence[Source]) -> Iterator[tuple[str, IO[bytes]]]:
    """Each source's name and line stream, in order; every source is closed at the end."""
    try:
        for source in sources:
            yield source.name, source.stream
    finally:
        for source in sources:
            source.close()


def progress(
    sources: Iterable[tuple[str, Iterable[bytes]]], terminal: TextIO
) -> Iterator[tuple[str, Iterator[bytes]]]:
    """`sources` with their lines counted on `terminal` every `PROGRESS_EVERY`."""
    read = 0

    def counted(lines: Iterable[bytes]) -> Iterator[bytes]:
        nonlocal read
        for line in lines:
            read += 1
            if read % PROGRESS_EVERY == 0:
                print(f"\raudit: {read:,} lines read", end="", file=terminal, flush=True)
            yield line

    for name, lines in sources:
        yield name, counted(lines)
    if read >= PROGRESS_EVERY:
        print(f"\raudit: {read:,} lines read", file=terminal, flush=True)
