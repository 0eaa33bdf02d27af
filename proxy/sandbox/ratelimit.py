"""Per-token fixed-window rate limit, windows aligned to the wall-clock minute like Laravel's."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["Clock", "FixedWindowLimiter", "RateDecision", "unix_clock"]

Clock = Callable[[], float]


def unix_clock() -> Clock:
    """A clock in Unix seconds that advances with the monotonic clock (no jumps when NTP steps)."""
    offset = time.time() - time.monotonic()
    return lambda: time.monotonic() + offset


class RateDecision(NamedTuple):
    """The outcome of one hit: whether it is allowed and the values for the X-RateLimit headers."""

    allowed: bool
    limit: int
    remaining: int
    reset: int
    retry_after: int


class FixedWindowLimiter:
    """Counts hits per key in fixed windows of `window_seconds`; O(1) per hit."""

    def __init__(self, limit: int, window_seconds: int = 60) -> None:
        if limit < 1 or window_seconds < 1:
            raise ValueError("limit and window_seconds must be positive")
        self.limit = limit
        self.window_seconds = window_seconds
        self._windows: dict[str, list[int]] = {}

    def hit(self, key: str, now: float) -> RateDecision:
        """Count one request by `key` at Unix time `now` and decide whether it may proceed."""
        window = int(now // self.window_seconds)
        state = self._windows.get(key)
        if state is None or state[0] != window:
            state = self._windows[key] = [window, 0]
        state[1] += 1
        reset = (window + 1) * self.window_seconds
        allowed = state[1] <= self.limit
        return RateDecision(
            allowed=allowed,
            limit=self.limit,
            remaining=max(self.limit - state[1], 0),
            reset=reset,
            retry_after=0 if allowed else max(math.ceil(reset - now), 1),
        )
