"""Whether the proxy can do its job: a token loaded, not expired, not refused by InvoisX.

`/readyz` reports it. InvoisX's answers to forwarded calls keep it current; an optional probe
(at most once a minute, off by default) notices a revoked token when no calls flow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from structlog.typing import FilteringBoundLogger

from proxy.config.credentials import TOKEN_LEVEL_ERRORS, TokenHolder, UpstreamToken
from proxy.exchange import new_request_id
from proxy.metrics import Metrics
from proxy.upstream.forwarder import Forwarder

__all__ = ["TokenHealth"]


class TokenHealth:
    """Tracks InvoisX's verdict on the current token and answers readiness questions."""

    def __init__(
        self,
        holder: TokenHolder,
        *,
        forwarder: Forwarder,
        metrics: Metrics,
        log: FilteringBoundLogger,
        probe_interval: float,
        state_store: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        self._holder = holder
        self._forwarder = forwarder
        self._metrics = metrics
        self._log = log
        self._probe_interval = probe_interval
        self._probed_at = float("-inf")
        self._state_store = state_store

    def upstream_answered(self, token: UpstreamToken, status: int, error_code: str | None) -> None:
        """Note InvoisX's answer to a call made with `token`; a token-level 401/403 condemns it."""
        if status not in (401, 403) or error_code not in TOKEN_LEVEL_ERRORS:
            return
        self._metrics.upstream_auth_failure()
        if self._holder.reject(token):
            self._log.error(
                "token_rejected",
                token_fingerprint=token.fingerprint,
                status=status,
                error_code=error_code,
            )

    async def readiness(self, now: datetime) -> tuple[bool, dict[str, Any]]:
        """(ready, details) for `/readyz`; probes InvoisX first when a probe is due."""
        token = self._holder.current
        if self._probe_due():
            status, error_code = await self._forwarder.probe(token.authorization, new_request_id())
            self.upstream_answered(token, status, error_code)
        expires_at = token.expires_at
        # Always present (null when unknown), so a monitor reads one shape in every state.
        details: dict[str, Any] = {
            "token_fingerprint": token.fingerprint,
            "token_expires_at": None if expires_at is None else expires_at.isoformat(),
        }
        if self._state_store is not None:
            # Reported, never a reason to be unready: each proxy runs on its share meanwhile.
            details["state_store"] = self._state_store()
        if expires_at is not None and now >= expires_at:
            return False, {"status": "unavailable", "reason": "token_expired", **details}
        if self._holder.rejected:
            return False, {"status": "unavailable", "reason": "token_rejected", **details}
        return True, {"status": "ready", **details}

    def _probe_due(self) -> bool:
        if not self._probe_interval:
            return False
        now = time.monotonic()
        if now - self._probed_at < self._probe_interval:
            return False
        self._probed_at = now
        return True
