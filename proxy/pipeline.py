"""The proxy endpoint: a request's whole path through the stages, in order.

target -> client identity -> policy -> forward -> audit. Each stage lives in its own module;
this one only runs them and turns a `ProxyError` from any of them into an InvoisX envelope.
"""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send
from structlog.typing import FilteringBoundLogger

from proxy.errors import INTERNAL_ERROR, ProxyError, send_error
from proxy.forward import Exchange, Forwarder
from proxy.identity import check_caller, peer_address
from proxy.paths import parse_target
from proxy.policy import METHOD_PERMISSIONS, Permission, Policy, check_no_method_override

__all__ = ["ProxyEndpoint"]

# A client-chosen request id is reused for tracing only when it cannot disturb a log line.
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


# Paths are logged as sent, but an absurd one must not blow up every log line.
_MAX_LOGGED_PATH = 2048


# Query keys are logged by name; bound them so one odd request cannot bloat the log.
_MAX_LOGGED_KEYS = 32
_MAX_KEY_LENGTH = 64


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and _SAFE_REQUEST_ID.fullmatch(value):
            return value.decode()
    return os.urandom(16).hex()


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
    """ASGI app for every path that is not one of the proxy's own (health)."""

    def __init__(
        self,
        *,
        policy: Policy,
        forwarder: Forwarder,
        audit: FilteringBoundLogger,
        token_fingerprint: str,
        loopback_listener: bool,
    ) -> None:
        self._loopback_listener = loopback_listener
        self._policy = policy
        self._forwarder = forwarder
        self._audit = audit
        self._fingerprint = token_fingerprint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        exchange = Exchange(request_id=_request_id(scope))
        method: str = scope["method"]
        required: Permission | None = None
        try:
            target = parse_target(scope["raw_path"])
            check_caller(scope, loopback_listener=self._loopback_listener)
            if method not in METHOD_PERMISSIONS:
                raise _method_not_allowed(method)
            check_no_method_override(scope)
            required = self._policy.required_permission(method, target.segments)
            self._policy.check(required, datetime.now(UTC))
            await self._forwarder(scope, receive, send, target.raw, exchange)
        except ProxyError as error:
            await self._refuse(send, error, exchange)
        except Exception:
            if exchange.status:
                # The response has started: only uvicorn can close the connection now.
                exchange.decision = INTERNAL_ERROR.decision
                exchange.error_code = INTERNAL_ERROR.error_code
                raise
            self._audit.exception("internal_error", request_id=exchange.request_id)
            await self._refuse(send, INTERNAL_ERROR, exchange)
        finally:
            self._log(scope, required, exchange, started)

    async def _refuse(self, send: Send, error: ProxyError, exchange: Exchange) -> None:
        exchange.status = error.status
        exchange.decision = error.decision
        exchange.error_code = error.error_code
        exchange.bytes_out = await send_error(send, error, exchange.request_id)

    def _log(
        self, scope: Scope, required: Permission | None, exchange: Exchange, started: float
    ) -> None:
        self._audit.info(
            "request",
            request_id=exchange.request_id,
            client=peer_address(scope),
            method=scope["method"][:16],
            path=scope["raw_path"][:_MAX_LOGGED_PATH].decode("latin-1"),
            query_keys=_query_keys(scope["query_string"]),
            status=exchange.status,
            decision=exchange.decision,
            required_permission=required,
            error_code=exchange.error_code,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            upstream_ms=None if exchange.upstream_ms is None else round(exchange.upstream_ms, 3),
            bytes_in=exchange.bytes_in,
            bytes_out=exchange.bytes_out,
            token_fingerprint=self._fingerprint,
        )
