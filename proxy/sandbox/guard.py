"""ASGI middleware in front of `/api/v1`: bearer authentication, then the per-token rate limit.

The authenticated token is left in `scope["sandbox.token"]` for the per-route permission check.
Rate-limit headers are added to every response sent to an authenticated token.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.sandbox.errors import SandboxError, error_response
from proxy.sandbox.ratelimit import Clock, FixedWindowLimiter
from proxy.sandbox.tokens import SandboxToken, TokenRegistry, authenticate

__all__ = ["TOKEN_SCOPE_KEY", "SandboxGuard", "scope_token"]

TOKEN_SCOPE_KEY = "sandbox.token"


def scope_token(scope: Scope) -> SandboxToken:
    """The token the guard authenticated for this request."""
    token: SandboxToken = scope[TOKEN_SCOPE_KEY]
    return token


class SandboxGuard:
    """Authenticates and rate-limits every HTTP request under `prefix`; passes the rest through."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tokens: TokenRegistry,
        limiter: FixedWindowLimiter | None,
        clock: Clock,
        prefix: str = "/api/v1",
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.limiter = limiter
        self.clock = clock
        self.prefix = prefix
        self.prefix_slash = prefix + "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if path != self.prefix and not path.startswith(self.prefix_slash):
            await self.app(scope, receive, send)
            return
        now = self.clock()
        try:
            token = authenticate(self.tokens, _authorization(scope), now)
        except SandboxError as exc:
            await error_response(scope, exc)(scope, receive, send)
            return
        scope[TOKEN_SCOPE_KEY] = token
        if self.limiter is None:
            await self.app(scope, receive, send)
            return

        decision = self.limiter.hit(token.value, now)
        rate_headers = [
            (b"x-ratelimit-limit", str(decision.limit).encode()),
            (b"x-ratelimit-remaining", str(decision.remaining).encode()),
            (b"x-ratelimit-reset", str(decision.reset).encode()),
        ]

        async def send_with_rate_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *rate_headers]
            await send(message)

        if decision.allowed:
            await self.app(scope, receive, send_with_rate_headers)
            return
        seconds = decision.retry_after
        error = SandboxError(
            429,
            "RATE_LIMIT_EXCEEDED",
            f"Too many requests. Please try again in {seconds} seconds.",
            headers={"Retry-After": str(seconds)},
        )
        await error_response(scope, error)(scope, receive, send_with_rate_headers)


def _authorization(scope: Scope) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"authorization":
            return value.decode("latin-1")
    return None
