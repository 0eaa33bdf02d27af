"""Token rotation without restart, and the warning before the token expires.

The token file is watched (`proxy.config.watch`); a good new file swaps the token atomically in the
`TokenHolder`, a bad one keeps the last good token. Every outcome is logged and counted.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from proxy.config.credentials import TokenHolder, parse_token_file
from proxy.config.settings import ConfigError
from proxy.metrics import Metrics

__all__ = ["TokenRotation", "warn_before_expiry"]

_DAY = 86_400.0


class TokenRotation:
    """Turns each change of the token file into a swap, or into a logged refusal."""

    def __init__(
        self, holder: TokenHolder, path: Path, *, log: FilteringBoundLogger, metrics: Metrics
    ) -> None:
        self._holder = holder
        self._path = path
        self._log = log
        self._metrics = metrics

    def on_change(self, content: bytes | OSError) -> None:
        """Load `content` (the file's bytes, or why it could not be read)."""
        current = self._holder.current
        try:
            if isinstance(content, OSError):
                raise ConfigError(
                    "INVOISX_API_TOKEN_FILE", f"cannot read {self._path}: {content.strerror}"
                )
            token = parse_token_file(content.decode("utf-8", "replace"))
        except ConfigError as error:
            self._metrics.token_reload("error")
            self._log.error(
                "token_reload_failed", reason=str(error), token_fingerprint=current.fingerprint
            )
            return
        if token.fingerprint == current.fingerprint and token.expires_at is None:
            # Same token, no expiry line: the expiry it started with still holds.
            token.expires_at = current.expires_at
        if (token.fingerprint, token.expires_at) == (current.fingerprint, current.expires_at):
            self._metrics.token_reload("unchanged")
            self._log.info("token_unchanged", token_fingerprint=current.fingerprint)
            return
        self._holder.swap(token)
        self._metrics.token_reload("success")
        self._log.warning(
            "token_reloaded",
            old_fingerprint=current.fingerprint,
            new_fingerprint=token.fingerprint,
            token_expires_at=token.expires_at.isoformat() if token.expires_at else None,
        )


async def warn_before_expiry(
    holder: TokenHolder, warning_days: int, log: FilteringBoundLogger, every: float = _DAY
) -> None:
    """Log `token_expiring` now and once a day (`every`) while the token expires within
    `warning_days`, and `token_expired` at error level once it has expired."""
    while True:
        token = holder.current
        pause = every
        if token.expires_at is not None:
            left = token.expires_at - datetime.now(UTC)
            if left <= timedelta(0):
                log.error(
                    "token_expired",
                    token_fingerprint=token.fingerprint,
                    token_expires_at=token.expires_at.isoformat(),
                    reason="InvoisX refuses an expired token: every call gets 401 and /readyz "
                    "503 until a new token is in place",
                )
            else:
                if warning_days and left < timedelta(days=warning_days):
                    log.warning(
                        "token_expiring",
                        token_fingerprint=token.fingerprint,
                        token_expires_at=token.expires_at.isoformat(),
                        days_left=left.days,
                    )
                # Wake at the moment of expiry too, not up to a day after it.
                pause = min(every, left.total_seconds() + 1)
        await asyncio.sleep(pause)
