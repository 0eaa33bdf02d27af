"""The proxy endpoint: a call's whole path through the stages, in order.

target -> caller and client -> policy -> limits -> rate limit -> idempotency -> forward ->
audit. Each stage lives in its own module and raises `ProxyError` to refuse; this one only
runs them, answers a refusal in the InvoisX envelope and writes the call's audit line.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from starlette.types import Receive, Scope, Send
from structlog.typing import FilteringBoundLogger

from proxy.audit import request_line
from proxy.config.configfile import ActiveConfig, ConfigHolder
from proxy.config.credentials import TokenHolder, UpstreamToken
from proxy.errors import INTERNAL_ERROR, SHUTTING_DOWN, ProxyError, send_error
from proxy.exchange import Exchange, new_request_id, request_id
from proxy.health import TokenHealth
from proxy.metrics import Metrics
from proxy.server.listener import WireRefusal
from proxy.stages.caller import identify
from proxy.stages.idempotency import (
    BodyBudget,
    Capture,
    IdempotencyStore,
    forward_once,
    idempotency_key,
    request_fingerprint,
)
from proxy.stages.limits import Body, BodyIncomplete, Limits, read_whole
from proxy.stages.override import JsonKeyScan
from proxy.stages.ratelimit import Admission, RateLimiter
from proxy.stages.target import parse_target, route_template
from proxy.upstream.forwarder import Forwarder

__all__ = ["ProxyEndpoint"]


class ProxyEndpoint:
    """ASGI app for every path that is not one of the proxy's own (health, metrics)."""

    def __init__(
        self,
        *,
        configs: ConfigHolder,
        tokens: TokenHolder,
        limits: Limits,
        limiter: RateLimiter | None,
        idempotency: IdempotencyStore,
        bodies: BodyBudget,
        forwarder: Forwarder,
        health: TokenHealth,
        metrics: Metrics,
        audit: FilteringBoundLogger,
        loopback_listener: bool,
    ) -> None:
        self._configs = configs
        self._tokens = tokens
        self._loopback_listener = loopback_listener
        self._limits = limits
        self._limiter = limiter
        self._idempotency = idempotency
        self._bodies = bodies
        self._forwarder = forwarder
        self._health = health
        self._metrics = metrics
        self._audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        # One config and one token for the whole call, even if a reload swaps them meanwhile.
        config = self._configs.current
        token = self._tokens.current
        exchange = Exchange(request_id(scope), client=config.clients.before_identified)
        try:
            await self._run_stages(scope, receive, send, exchange, config, token)
        except ProxyError as error:
            await self._refuse(send, error, exchange)
        except BodyIncomplete:
            exchange.body_cut_short()  # while its body was being read: no one to answer
        except asyncio.CancelledError:
            # Only uvicorn cancels this task: the shutdown grace period ran out. Answer if we
            # still can, then end quietly; the server no longer waits for this task.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if exchange.status:
                exchange.aborted(SHUTTING_DOWN)
            else:
                await self._refuse(send, SHUTTING_DOWN, exchange)
        except Exception:
            if exchange.status:
                # The response has started: only uvicorn can close the connection now.
                exchange.aborted(INTERNAL_ERROR)
                raise
            self._audit.exception("internal_error", request_id=exchange.request_id)
            await self._refuse(send, INTERNAL_ERROR, exchange)
        finally:
            self._finish(scope, token, exchange, started)

    async def _run_stages(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        config: ActiveConfig,
        token: UpstreamToken,
    ) -> None:
        """The stages in order; each raises `ProxyError` to refuse the call."""
        target = parse_target(scope["raw_path"])
        exchange.route = route_template(target.segments, config.route_names)
        client = identify(scope, config.clients, loopback_listener=self._loopback_listener)
        exchange.client = client.name
        grant = config.policy.authorize(
            scope, target.segments, client.permissions, token.expires_at, datetime.now(UTC)
        )
        exchange.required = grant.required
        body = self._limits.check(scope, receive, exchange)
        key = idempotency_key(scope)
        admission = Admission(
            self._limiter, client.name, client.requests_per_minute, config.clients.reservations
        )
        if key is None:
            inspect = None if grant.scan is None else grant.scan.feed
            request = self._forwarder.request(
                scope, target.raw, token.authorization, exchange.request_id, body, inspect
            )
            # Watched from the first rate-limit wait: a client that leaves meanwhile stops it.
            async with self._forwarder.watch(receive, exchange, request, keep_answer=False) as call:
                exchange.waited_ms += await admission.admit() * 1000
                await self._forwarder(request, call, send, exchange, admission)
        else:
            # Admitted before the body is read, so that a call that waits holds no body.
            exchange.waited_ms += await admission.admit() * 1000
            await self._forward_once(
                scope,
                receive,
                send,
                exchange,
                f"{client.name}:{key.decode()}",
                target.raw,
                token.authorization,
                body,
                grant.scan,
                admission,
            )
        self._health.upstream_answered(token, exchange.status, exchange.error_code)
        self._metrics.ratelimit_remaining(exchange.ratelimit_remaining)

    async def _forward_once(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        key: str,
        path: str,
        authorization: bytes,
        body: Body | None,
        scan: JsonKeyScan | None,
        admission: Admission,
    ) -> None:
        """An Idempotency-Key call: the body decides whether a repeat is the same request, so
        it is read whole first, within the budget for held bodies."""
        sent = False
        try:
            with self._bodies.holding() as hold:
                whole = await read_whole(
                    body, receive, client_timeout=self._limits.client_timeout, hold=hold
                )
                if scan is not None:
                    scan.feed(whole)
                request = self._forwarder.request(
                    scope, path, authorization, exchange.request_id, whole
                )

                async def send_once(capture: Capture) -> None:
                    nonlocal sent
                    sent = True
                    watch = self._forwarder.watch(receive, exchange, request, keep_answer=True)
                    async with watch as call:
                        await self._forwarder(request, call, send, exchange, admission, capture)

                fingerprint = request_fingerprint(scope, whole)
                await forward_once(self._idempotency, key, fingerprint, send_once, send, exchange)
        finally:
            if not sent:
                await admission.refund()

    def refused_on_wire(self, refusal: WireRefusal) -> str:
        """Audit and count a request that the HTTP parser refused before it became a call;
        returns its request id."""
        started = time.perf_counter()
        config = self._configs.current
        exchange = Exchange(new_request_id(), client=config.clients.before_identified)
        exchange.refused(refusal.error, 0)
        scope: Scope = {
            "method": refusal.method,
            "raw_path": b"",
            "query_string": b"",
            "client": refusal.peer,
        }
        self._finish(scope, self._tokens.current, exchange, started)
        return exchange.request_id

    async def _refuse(self, send: Send, error: ProxyError, exchange: Exchange) -> None:
        exchange.refused(error, await send_error(send, error, exchange.request_id))

    def _finish(
        self, scope: Scope, token: UpstreamToken, exchange: Exchange, started: float
    ) -> None:
        seconds = time.perf_counter() - started
        upstream_ms = exchange.upstream_ms
        self._metrics.request(
            method=scope["method"],
            route=exchange.route,
            status=exchange.status,
            decision=exchange.decision,
            client=exchange.client,
            seconds=seconds,
            upstream_seconds=None if upstream_ms is None else upstream_ms / 1000,
            waited_seconds=exchange.waited_ms / 1000,
        )
        self._audit.info("request", **request_line(exchange, scope, token.fingerprint, seconds))
