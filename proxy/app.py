"""`create_app(settings)`: wires the stages into one Starlette app. No logic lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from proxy import __version__
from proxy.audit import AuditLog
from proxy.configfile import load_config_file
from proxy.credentials import load_token
from proxy.errors import envelope
from proxy.forward import Forwarder
from proxy.pipeline import ProxyEndpoint
from proxy.policy import Policy
from proxy.settings import Settings

__all__ = ["create_app"]

EXPIRY_WARNING = timedelta(days=30)


async def healthz(request: Request) -> Response:
    """Liveness: answers without touching InvoisX."""
    return JSONResponse({"status": "ok"})


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug in the proxy still answers in the InvoisX envelope, never with a traceback."""
    body = envelope("INTERNAL_ERROR", "The proxy failed to handle this request.")
    return Response(body, status_code=500, media_type="application/json")


def create_app(settings: Settings, *, audit_to_stdout: bool = True) -> Starlette:
    """Build the app; raises `ConfigError` for a bad token, config file or log file."""
    token = load_token(settings)
    config = load_config_file(settings.config)
    policy = Policy(
        granted=settings.token_permissions,
        expires_at=settings.token_expires_at,
        rules=config.rules,
    )
    audit = AuditLog(settings.log_file, to_stdout=audit_to_stdout)
    # trust_env=False: no proxy variables or .netrc may redirect or re-authenticate our calls.
    client = httpx.AsyncClient(
        timeout=settings.upstream_timeout,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
        trust_env=False,
    )
    endpoint = ProxyEndpoint(
        policy=policy,
        forwarder=Forwarder(
            client,
            base_url=settings.api_url,
            authorization=token.authorization,
            max_body=settings.max_body_bytes,
        ),
        audit=audit.logger,
        token_fingerprint=token.fingerprint,
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
            async with client:
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
    app.state.settings = settings
    app.state.policy = policy
    app.state.token_fingerprint = token.fingerprint
    return app
