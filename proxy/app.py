"""`create_app(settings)`: wires the stages into one ASGI app. No logic lives here.

API calls go straight to the proxy endpoint; the proxy's own routes (health) and the audited
404 for everything else are a small Starlette app.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from functools import partial

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from structlog.typing import FilteringBoundLogger

from proxy import __version__
from proxy.audit import AuditLog
from proxy.config.configfile import ConfigHolder, ConfigReload, build_config, load_config_file
from proxy.config.credentials import TokenHolder, UpstreamToken, load_token
from proxy.config.rotation import TokenRotation, warn_before_expiry
from proxy.config.settings import ConfigError, Settings, is_loopback
from proxy.config.watch import FileWatch
from proxy.errors import INTERNAL_ERROR, envelope
from proxy.health import TokenHealth
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.pipeline import ProxyEndpoint
from proxy.server.listener import ClientProtocol, client_protocol
from proxy.stages.idempotency import BodyBudget, IdempotencyStore, MemoryStore
from proxy.stages.limits import Limits
from proxy.stages.ratelimit import Budget, MemoryBudget, RateLimiter
from proxy.store.budget import SharedBudget
from proxy.store.idempotency import LEASE_MARGIN, SharedIdempotency
from proxy.store.state import StateStore, redis_client
from proxy.upstream.forwarder import Forwarder

__all__ = ["ProxyFirst", "create_app"]


async def healthz(request: Request) -> Response:
    """Liveness: answers without touching InvoisX."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: 200 while the token is loaded, unexpired and accepted by InvoisX, else 503."""
    ready, details = await request.app.state.health.readiness(datetime.now(UTC))
    return JSONResponse(details, status_code=200 if ready else 503)


async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug in the proxy still answers in the InvoisX envelope, never with a traceback."""
    body = envelope(INTERNAL_ERROR.error_code, INTERNAL_ERROR.message)
    return Response(body, status_code=INTERNAL_ERROR.status, media_type="application/json")


# The proxy's own routes; every other HTTP path is the proxy endpoint's to answer or refuse.
OWN_PATHS = frozenset({b"/healthz", b"/readyz", b"/metrics"})


class ProxyFirst:
    """ASGI entry: the proxy's own routes (and lifespan) go to Starlette, every other HTTP
    request straight to the proxy endpoint.

    Starlette's middleware and routing cost a measurable share of every proxied call
    (bench/README.md); the endpoint answers its own errors (404 outside `/api/v1/` included), so
    no path, however odd, falls through to a response outside the InvoisX envelope.
    """

    def __init__(
        self, endpoint: ProxyEndpoint, app: Starlette, protocol: type[ClientProtocol]
    ) -> None:
        self.endpoint = endpoint
        self.app = app
        # The connection protocol to serve this app with (`serving.server_config`).
        self.protocol = protocol

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # InvoisX has no WebSocket API; closing before accepting answers 403.
            await send({"type": "websocket.close", "code": 1008})
        elif scope["type"] == "http" and scope["raw_path"] not in OWN_PATHS:
            await self.endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(settings: Settings, *, audit_to_stdout: bool = True) -> ProxyFirst:
    """Build the app; raises `ConfigError` for a bad token, config file or log file."""
    tokens = TokenHolder(load_token(settings, datetime.now(UTC)))
    configs = ConfigHolder(build_config(load_config_file(settings.config), settings))
    audit = AuditLog(settings.log_file, to_stdout=audit_to_stdout)
    metrics = Metrics(tokens)
    forwarder = Forwarder(
        log=audit.logger,
        metrics=metrics,
        base_url=settings.api_url,
        timeout=settings.upstream_timeout,
        max_connections=settings.max_upstream_connections,
        retry_max=settings.retry_max,
        client_timeout=settings.client_timeout,
    )
    store = _state_store(settings, audit.logger, metrics)
    shared = _shared_budget(settings, store, tokens, metrics)
    health = TokenHealth(
        tokens,
        forwarder=forwarder,
        metrics=metrics,
        log=audit.logger,
        probe_interval=settings.ready_probe_interval,
        state_store=(shared.describe if shared else store.describe) if store else None,
    )
    endpoint = ProxyEndpoint(
        configs=configs,
        tokens=tokens,
        limits=Limits(
            max_body=settings.max_body_bytes,
            max_header_bytes=settings.max_header_bytes,
            client_timeout=settings.client_timeout,
        ),
        limiter=_limiter(settings, shared),
        idempotency=_idempotency(settings, store, audit.logger),
        bodies=BodyBudget(settings.max_buffered_bytes),
        forwarder=forwarder,
        health=health,
        metrics=metrics,
        audit=audit.logger,
        loopback_listener=is_loopback(settings.host),
    )
    watches = []
    if settings.api_token_file is not None:
        rotation = TokenRotation(tokens, settings.api_token_file, log=audit.logger, metrics=metrics)
        watches.append(
            FileWatch(settings.api_token_file, rotation.on_change, settings.reload_interval)
        )
    if settings.config is not None:
        reload = ConfigReload(configs, settings.config, settings, log=audit.logger)
        watches.append(FileWatch(settings.config, reload.on_change, settings.reload_interval))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log = audit.logger
        config = configs.current
        _announce(log, settings, tokens.current, config.rules, len(config.clients))
        background = [
            asyncio.create_task(warn_before_expiry(tokens, settings.expiry_warning_days, log)),
            *(asyncio.create_task(watch.run()) for watch in watches),
        ]
        if shared is not None:
            # Unreachable now is no reason not to start: the proxy runs on its share meanwhile.
            await shared.heartbeat()
            background.append(asyncio.create_task(shared.run()))
        elif store is not None:
            background.append(asyncio.create_task(store.watch()))
        try:
            with _on_sighup(partial(_poke, watches)):
                async with forwarder:
                    yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if store is not None:
                await store.aclose()
            log.info("shutdown", token_fingerprint=tokens.current.fingerprint)
            audit.close()

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", prometheus_metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={Exception: internal_error},
    )
    app.router.redirect_slashes = False
    app.state.health = health
    app.state.metrics = metrics
    protocol = client_protocol(
        max_header_bytes=settings.max_header_bytes,
        client_timeout=settings.client_timeout,
        max_idle=settings.max_idle_connections,
        report=endpoint.refused_on_wire,
    )
    return ProxyFirst(endpoint, app, protocol)


def _state_store(
    settings: Settings, log: FilteringBoundLogger, metrics: Metrics
) -> StateStore | None:
    """Redis, when INVOISX_PROXY_REDIS_URL names one."""
    if settings.redis_url is None:
        return None
    try:
        redis = redis_client(settings.redis_url.get_secret_value(), settings.redis_timeout)
    except ValueError as error:
        raise ConfigError("INVOISX_PROXY_REDIS_URL", f"cannot be used: {error}") from None
    return StateStore(redis, timeout=settings.redis_timeout, log=log, metrics=metrics)


def _shared_budget(
    settings: Settings, store: StateStore | None, tokens: TokenHolder, metrics: Metrics
) -> SharedBudget | None:
    """The budget on Redis, when there is a Redis and a limit is set."""
    if store is None or not settings.rate_limit_per_minute:
        return None
    return SharedBudget(
        store,
        tokens,
        settings.rate_limit_per_minute,
        prefix=settings.redis_prefix,
        metrics=metrics,
    )


def _idempotency(
    settings: Settings, store: StateStore | None, log: FilteringBoundLogger
) -> IdempotencyStore:
    """Idempotency-Keys on Redis when there is one, else in this process's memory."""
    if store is None:
        return MemoryStore(
            ttl=settings.idempotency_ttl,
            max_entries=settings.idempotency_max_entries,
            max_bytes=settings.idempotency_max_bytes,
        )
    return SharedIdempotency(
        store,
        prefix=settings.redis_prefix,
        # A claim outlives its call: the upstream timeout bounds the wait for InvoisX's answer.
        lease=settings.upstream_timeout + LEASE_MARGIN,
        ttl=settings.idempotency_ttl,
        log=log,
    )


def _limiter(settings: Settings, shared: SharedBudget | None) -> RateLimiter | None:
    """The rate limit over the shared budget, or one of this process's own; None when off."""
    if not settings.rate_limit_per_minute:
        return None
    budget: Budget = shared or MemoryBudget(settings.rate_limit_per_minute)
    return RateLimiter(
        budget, max_wait=settings.rate_limit_max_wait, max_queue=settings.rate_limit_max_queue
    )


def _poke(watches: list[FileWatch]) -> None:
    for watch in watches:
        watch.poke()


def _address(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _announce(
    log: FilteringBoundLogger,
    settings: Settings,
    token: UpstreamToken,
    rules: int,
    clients: int,
) -> None:
    """The start-up line, then a warning for each setting that likely is not what was meant."""
    log.info(
        "startup",
        version=__version__,
        listen=_address(settings.host, settings.port),
        upstream=settings.api_url,
        token_fingerprint=token.fingerprint,
        token_permissions=sorted(settings.token_permissions),
        token_expires_at=token.expires_at.isoformat() if token.expires_at else None,
        token_file=str(settings.api_token_file) if settings.api_token_file else None,
        rules=rules,
        clients=clients,
        state_store="redis" if settings.redis_url else None,
    )
    for unknown in settings.unknown_variables:
        log.warning(
            "unknown_setting",
            variable=unknown.name,
            source=unknown.source,
            did_you_mean=unknown.closest,
            reason="no setting reads this variable; it is ignored",
        )
    if settings.permissions_defaulted:
        log.warning(
            "default_permissions",
            token_permissions=sorted(settings.token_permissions),
            reason="INVOISX_TOKEN_PERMISSIONS is not set, so the proxy refuses every create, "
            "update and delete; set it to what the token may do in the InvoisX dashboard",
        )
    if not clients and not is_loopback(settings.host):
        log.warning(
            "anonymous_access",
            host=settings.host,
            reason="INVOISX_PROXY_ALLOW_ANONYMOUS=true and no client keys: anyone who can "
            "reach this address can use the token",
        )


@contextmanager
def _on_sighup(reload: Callable[[], object]) -> Iterator[None]:
    """Run `reload` on SIGHUP while inside. Only the main thread may own signals (the demo and
    the tests serve from other threads, and reload by polling alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
