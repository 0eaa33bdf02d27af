"""Watching a file for changes: polled, and on demand (SIGHUP).

Polling suits every way a file is replaced in practice: edited in place, renamed over, or
swapped through a symlink by a secrets manager or Kubernetes. The content is compared, not
only the modification time, so two writes within the same clock tick are not missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path

__all__ = ["FileWatch"]


def _read(path: Path) -> bytes | OSError:
    try:
        return path.read_bytes()
    except OSError as error:
        return error


def _signature(content: bytes | OSError) -> str:
    if isinstance(content, OSError):
        return f"error:{content.errno}"
    return hashlib.sha256(content).hexdigest()


class FileWatch:
    """Calls `on_change(content or error)` when the file's content or readability changes.

    `poke()` forces a read and a call even when nothing changed (what SIGHUP asks for).
    """

    def __init__(
        self, path: Path, on_change: Callable[[bytes | OSError], None], interval: float
    ) -> None:
        self._path = path
        self._on_change = on_change
        self._interval = interval
        self._poked = asyncio.Event()
        self._seen = _signature(_read(path))

    def poke(self) -> None:
        """Re-read now and report, changed or not."""
        self._poked.set()

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self._interval)
            forced = self._poked.is_set()
            self._poked.clear()
            content = await asyncio.to_thread(_read, self._path)
            seen = _signature(content)
            if forced or seen != self._seen:
                self._seen = seen
                self._on_change(content)
