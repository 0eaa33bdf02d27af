"""The proxy endpoint: a request's whole path through the stages, in order.

target -> client identity -> policy -> forward -> audit. Each stage lives in its own module;
this one only runs them and turns a `ProxyError` from any of them into an InvoisX envelope.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send
from structlog.typing import FilteringBoundLogger

from proxy.config.configfile import ActiveConfig, ConfigHolder
from proxy.config.credentials import TokenHolder, UpstreamToken
from proxy.errors import INTERNAL_ERROR, SHUTTING_DOWN, ProxyError, send_error
from proxy.health import TokenHealth
from proxy.metrics import Metrics
from proxy.server.listener import WireRefusal
from proxy.stages.caller import check_caller, peer_address
from proxy.stages.idempotency import (
    BodyBudget,
    IdempotencyStore,
    forward_once,
    idempotency_key,
    request_fingerprint,
)
from proxy.stages.policy import METHOD_PERMISSIONS, JsonKeyScan, check_no_method_override
from proxy.stages.target import parse_target, route_template
from proxy.upstream.forwarder import (
    BodyIncomplete,
    Capture,
    ClientDisconnected,
    Exchange,
    Forwarder,
    read_body,
)

__all__ = ["ProxyEndpoint"]

# A client-chosen request id is reused for tracing only when it cannot disturb a log line.
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


# Paths are logged as sent, but an absurd one must not blow up every log line.
_MAX_LOGGED_PATH = 2048


# Query keys are logged by name; bound them so one odd request cannot bloat the log.
_MAX_LOGGED_KEYS = 32
_MAX_KEY_LENGTH = 64


def _request_id(scope: Scope) -> str:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"x-request-id" and _SAFE_REQUEST_ID.fullmatch(value):
            return value.decode()
    return _new_request_id()


# Ids are for tracing, not secrets: no system call for randomness on every request. A
# generator of its own, seeded once from the OS, so that nothing reseeding the module's
# shared one (a test framework, a library) can make ids repeat.
_IDS = random.Random()


def _new_request_id() -> str:
    return f"{_IDS.getrandbits(128):032x}"


def _query_keys(query_string: bytes) -> list[str]:
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    return sorted({key[:_MAX_KEY_LENGTH] for key, _ in pairs})[:_MAX_LOGGED_KEYS]


def _method_not_allowed(method: str) -> ProxyError:
    allowed = ", ".join(METHOD_PERMISSIONS)
    return ProxyError(
        405,
        "METHOD_NOT_ALLOWED",
        f"The {method[:16]} method is not supported by the InvoisX API.",
        headers={"allow": allowed},
    )


class ProxyEndpoint:
    """ASGI app for every path that is not one of the proxy's own (health, metrics)."""

    def __init__(
        self,
        *,
        configs: ConfigHolder,
        tokens: TokenHolder,
        forwarder: Forwarder,
        health: TokenHealth,
        metrics: Metrics,
        audit: FilteringBoundLogger,
        idempotency: IdempotencyStore,
        bodies: BodyBudget,
        max_body: int,
        client_timeout: float,
        loopback_listener: bool,
    ) -> None:
        self._loopback_listener = loopback_listener
        self._idempotency = idempotency
        self._bodies = bodies
        self._max_body = max_body
        self._client_timeout = client_timeout
        self._configs = configs
        self._tokens = tokens
        self._forwarder = forwarder
        self._health = health
        self._metrics = metrics
        self._audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        # One config and one token for the whole call, even if a reload swaps them meanwhile.
        config = self._configs.current
        token = self._tokens.current
        exchange = Exchange(_request_id(scope), client=config.clients.before_identified)
        try:
            await self._run_stages(scope, receive, send, exchange, config, token)
        except ProxyError as error:
            await self._refuse(send, error, exchange)
        except BodyIncomplete:
            exchange.body_cut_short()  # while its body was being read: no one to answer
        except ClientDisconnected:
            exchange.client_gone()
        except asyncio.CancelledError:
            # Only uvicorn cancels this task: the shutdown grace period ran out. Answer if we
            # still can, then end quietly; the server no longer waits for this task.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if exchange.status:
                exchange.decision = SHUTTING_DOWN.decision
                exchange.error_code = SHUTTING_DOWN.error_code
            else:
                await self._refuse(send, SHUTTING_DOWN, exchange)
        except Exception:
            if exchange.status:
                # The response has started: only uvicorn can close the connection now.
                exchange.decision = INTERNAL_ERROR.decision
                exchange.error_code = INTERNAL_ERROR.error_code
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
        """target -> caller and client -> policy -> forward; each stage raises `ProxyError`."""
        target = parse_target(scope["raw_path"])
        exchange.route = route_template(target.segments, config.route_names)
        check_caller(scope, loopback_listener=self._loopback_listener)
        client = config.clients.identify(scope["headers"])
        exchange.client = client.name
        method: str = scope["method"]
        if method not in METHOD_PERMISSIONS:
            raise _method_not_allowed(method)
        scan = check_no_method_override(scope)
        exchange.required = config.policy.required_permission(method, target.segments)
        config.policy.check(
            exchange.required, token.expires_at, datetime.now(UTC), client.permissions
        )
        forward = functools.partial(
            self._forwarder,
            scope,
            receive,
            send,
            target.raw,
            exchange,
            token.authorization,
            client_per_minute=client.requests_per_minute,
        )
        key = idempotency_key(scope)
        if key is None:
            await forward(inspect=None if scan is None else scan.feed)
        else:
            await self._forward_once(
                scope,
                receive,
                send,
                exchange,
                f"{client.name}:{key.decode()}",
                scan,
                forward,
                client.requests_per_minute,
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
        scan: JsonKeyScan | None,
        forward: Callable[..., Awaitable[None]],
        client_per_minute: int | None,
    ) -> None:
        """An Idempotency-Key call: the body decides whether a repeat is the same request, so
        it is read whole first, within the budget for held bodies, and only once the rate
        limit lets the call go, so that a call that waits holds no body."""
        self._forwarder.check_request_size(scope["headers"])
        await self._forwarder.admit(exchange, client_per_minute)
        sent = False

        def send_once(capture: Capture) -> Awaitable[None]:
            nonlocal sent
            sent = True
            return forward(preread=body, capture=capture, admitted=True)

        try:
            with self._bodies.holding() as hold:
                body = await read_body(
                    scope,
                    receive,
                    exchange,
                    limit=self._max_body,
                    client_timeout=self._client_timeout,
                    hold=hold,
                )
                if scan is not None:
                    scan.feed(body)
                fingerprint = request_fingerprint(scope, body)
                await forward_once(self._idempotency, key, fingerprint, send_once, send, exchange)
        finally:
            if not sent:
                self._forwarder.refund(exchange.client)

    def refused_on_wire(self, refusal: WireRefusal) -> str:
        """Audit and count a request that the HTTP parser refused before it became a call;
        returns its request id."""
        started = time.perf_counter()
        config = self._configs.current
        exchange = Exchange(_new_request_id(), client=config.clients.before_identified)
        exchange.status = refusal.error.status
        exchange.decision = refusal.error.decision
        exchange.error_code = refusal.error.error_code
        scope: Scope = {
            "method": refusal.method,
            "raw_path": b"",
            "query_string": b"",
            "client": refusal.peer,
        }
        self._finish(scope, self._tokens.current, exchange, started)
        return exchange.request_id

    async def _refuse(self, send: Send, error: ProxyError, exchange: Exchange) -> None:
        exchange.status = error.status
        exchange.decision = error.decision
        exchange.error_code = error.error_code
        exchange.bytes_out = await send_error(send, error, exchange.request_id)

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
        self._audit.info(
            "request",
            request_id=exchange.request_id,
            client=exchange.client,
            peer=peer_address(scope),
            method=scope["method"][:16],
            path=scope["raw_path"][:_MAX_LOGGED_PATH].decode("latin-1"),
            route=exchange.route,
            query_keys=_query_keys(scope["query_string"]),
            status=exchange.status,
            decision=exchange.decision,
            required_permission=exchange.required,
            error_code=exchange.error_code,
            duration_ms=round(seconds * 1000, 3),
            upstream_ms=None if upstream_ms is None else round(upstream_ms, 3),
            waited_ms=round(exchange.waited_ms, 3),
            retries=exchange.retries,
            bytes_in=exchange.bytes_in,
            bytes_out=exchange.bytes_out,
            token_fingerprint=token.fingerprint,
        )
