"""`create_app(settings)`: wires the stages into one ASGI app. No logic lives here.

API calls go straight to the proxy endpoint; the proxy's own routes (health) and the audited
404 for everything else are a small Starlette app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from proxy import __version__
from proxy.audit import AuditLog
from proxy.configfile import load_config_file
from proxy.credentials import load_token
from proxy.errors import INTERNAL_ERROR, envelope
from proxy.forward import Forwarder
from proxy.paths import API_PREFIX
from proxy.pipeline import ProxyEndpoint
from proxy.policy import Policy
from proxy.settings import Settings, is_loopback

__all__ = ["ProxyFirst", "create_app"]

EXPIRY_WARNING = timedelta(days=30)


async def healthz(request: Request) -> Response:
    """Liveness: answers without touching InvoisX."""
    return JSONResponse({"status": "ok"})


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug in the proxy still answers in the InvoisX envelope, never with a traceback."""
    body = envelope(INTERNAL_ERROR.error_code, INTERNAL_ERROR.message)
    return Response(body, status_code=INTERNAL_ERROR.status, media_type="application/json")


class ProxyFirst:
    """ASGI entry: `/api/v1/` requests go straight to the proxy endpoint, the rest to Starlette.

    Starlette's middleware and routing cost a measurable share of every proxied call (README,
    Performance); the endpoint answers its own errors, so the hot path does not need them.
    """

    def __init__(self, endpoint: ProxyEndpoint, app: Starlette) -> None:
        self.endpoint = endpoint
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # InvoisX has no WebSocket API; closing before accepting answers 403.
            await send({"type": "websocket.close", "code": 1008})
        elif scope["type"] == "http" and scope["raw_path"].startswith(API_PREFIX):
            await self.endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(settings: Settings, *, audit_to_stdout: bool = True) -> ProxyFirst:
    """Build the app; raises `ConfigError` for a bad token, config file or log file."""
    token = load_token(settings)
    config = load_config_file(settings.config)
    policy = Policy(
        granted=settings.token_permissions,
        expires_at=settings.token_expires_at,
        rules=config.rules,
    )
    audit = AuditLog(settings.log_file, to_stdout=audit_to_stdout)
    forwarder = Forwarder(
        base_url=settings.api_url,
        authorization=token.authorization,
        max_body=settings.max_body_bytes,
        timeout=settings.upstream_timeout,
    )
    endpoint = ProxyEndpoint(
        policy=policy,
        forwarder=forwarder,
        audit=audit.logger,
        token_fingerprint=token.fingerprint,
        loopback_listener=is_loopback(settings.host),
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log = audit.logger
        log.info(
            "startup",
            version=__version__,
            upstream=settings.api_url,
            token_fingerprint=token.fingerprint,
            token_permissions=sorted(policy.granted),
            token_expires_at=policy.expires_at.isoformat() if policy.expires_at else None,
            rules=len(config.rules),
        )
        if policy.expires_at and policy.expires_at - datetime.now(UTC) < EXPIRY_WARNING:
            log.warning(
                "token_expiring",
                token_fingerprint=token.fingerprint,
                token_expires_at=policy.expires_at.isoformat(),
            )
        try:
            async with forwarder:
                yield
        finally:
            log.info("shutdown", token_fingerprint=token.fingerprint)
            audit.close()

    app = Starlette(
        routes=[Route("/healthz", healthz, methods=["GET"]), Mount("", app=endpoint)],
        lifespan=lifespan,
        exception_handlers={Exception: internal_error},
    )
    app.router.redirect_slashes = False
    return ProxyFirst(endpoint, app)
