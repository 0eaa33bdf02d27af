"""Watching a file for changes: polled, and on demand (SIGHUP).

Polling suits every way a file is replaced in practice: edited in place, renamed over, or
swapped through a symlink by a secrets manager or Kubernetes. The content is compared, not
only the modification time, so two writes within the same clock tick are not missed.

A file rewritten in place is half-written for a while, and its first half may load (a config
file without its last rules). So a change counts only once the file has read the same for
`SETTLE_SECONDS`; every new content seen meanwhile starts the wait again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path

__all__ = ["SETTLE_SECONDS", "FileWatch"]

# Long enough for a writer's bursts (a shell's `tee`, a script's two writes) to run together;
# short enough that a rotated token is in use within the polling interval plus this.
SETTLE_SECONDS = 0.5


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
    """Calls `on_change(content or error)` when the file's content or readability changes,
    once it has stayed the same for `SETTLE_SECONDS`.

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
        """Re-read now and report once settled, changed or not."""
        self._poked.set()

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self._interval)
            forced = self._poked.is_set()
            self._poked.clear()
            content = await asyncio.to_thread(_read, self._path)
            if not forced and _signature(content) == self._seen:
                continue
            content = await self._settled(content)
            seen = _signature(content)
            # A write undone while settling (back to the content in force) is no change.
            if forced or seen != self._seen:
                self._seen = seen
                self._on_change(content)

    async def _settled(self, content: bytes | OSError) -> bytes | OSError:
        """The file's content once a read `SETTLE_SECONDS` after the last finds it unchanged."""
        while True:
            await asyncio.sleep(SETTLE_SECONDS)
            again = await asyncio.to_thread(_read, self._path)
            if _signature(again) == _signature(content):
                return again
            content = again
