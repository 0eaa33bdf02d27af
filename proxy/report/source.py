"""Input: log files (plain or gzip, told apart by their first bytes) or stdin, line by line."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, BinaryIO, TextIO, TypeVar

from proxy.report.options import AuditError

__all__ = ["PROGRESS_EVERY", "STDIN_NAME", "Source", "numbered_lines", "open_sources", "progress"]

STDIN_NAME = "-"
# Progress is shown only on a terminal, and only once the input proves large.
PROGRESS_EVERY = 200_000
_GZIP_MAGIC = b"\x1f\x8b"
_T = TypeVar("_T")


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


def _source(name: str, stream: BinaryIO, file: BinaryIO | None) -> Source:
    # peek() looks without consuming, so a pipe (stdin) can be sniffed too.
    head = stream.peek(2)[:2] if hasattr(stream, "peek") else b""
    if head == _GZIP_MAGIC:
        return Source(name, gzip.GzipFile(fileobj=stream, mode="rb"), file)
    return Source(name, stream, file)


def open_sources(paths: Sequence[str], stdin: BinaryIO) -> list[Source]:
    """Open every input before reading any, so a bad path fails before output starts.

    No path, or `-`, is stdin.
    """
    sources: list[Source] = []
    for path in paths or [STDIN_NAME]:
        try:
            if path == STDIN_NAME:
                sources.append(_source(path, stdin, None))
                continue
            file = open(path, "rb")  # noqa: SIM115  # closed by numbered_lines
            sources.append(_source(path, file, file))
        except OSError as error:
            for source in sources:
                source.close()
            raise AuditError(f"cannot read {path}: {_reason(error)}") from None
    return sources


def numbered_lines(sources: Sequence[Source]) -> Iterator[tuple[str, int, bytes]]:
    """`(source name, line number, line)` for every line of every source, in order."""
    try:
        for source in sources:
            try:
                for number, line in enumerate(source.stream, 1):
                    yield source.name, number, line
            except (OSError, EOFError, zlib.error) as error:
                raise AuditError(f"cannot read {source.name}: {_reason(error)}") from None
    finally:
        for source in sources:
            source.close()


def progress(items: Iterable[_T], terminal: TextIO) -> Iterator[_T]:
    """Pass `items` through, counting them on `terminal` every `PROGRESS_EVERY`."""
    count = 0
    for count, item in enumerate(items, 1):  # noqa: B007  # count is read after the loop
        if count % PROGRESS_EVERY == 0:
            print(f"\raudit: {count:,} lines read", end="", file=terminal, flush=True)
        yield item
    if count >= PROGRESS_EVERY:
        print(f"\raudit: {count:,} lines read", file=terminal, flush=True)
