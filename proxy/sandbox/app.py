"""`create_sandbox_app`: an in-memory stand-in for the InvoisX API under `/api/v1`.

Choices where the real API is undocumented:
- Authentication and the rate limit run before routing, so an unknown path or a wrong method
  needs a valid token too (then 404 NOT_FOUND / 405 METHOD_NOT_ALLOWED with an `Allow` header).
- A body that is not declared `Content-Type: application/json`, is not valid JSON, or is not a
  JSON object is 422 VALIDATION_FAILED with the message under `errors.body`.
- PATCH is accepted wherever PUT is, as a full update (Laravel's `apiResource` does the same).
- `rate_limit_per_minute=0` disables the limit and its `X-RateLimit-*` headers.
- An invoice PUT checks existence (404), then status (403), then the body (422).
- A client that leaves before its body is in gets no answer and nothing is logged: the request
  was never complete, so nothing is done (nginx in front of Laravel reads the whole body before
  PHP sees the request, and records such a client as 499).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from proxy.sandbox import buyers, invoices
from proxy.sandbox.errors import SandboxError, error_response, forbidden
from proxy.sandbox.guard import SandboxGuard, scope_token
from proxy.sandbox.ratelimit import FixedWindowLimiter, unix_clock
from proxy.sandbox.store import SandboxStore
from proxy.sandbox.tokens import SandboxToken, TokenRegistry

__all__ = ["API_PREFIX", "create_sandbox_app"]

API_PREFIX = "/api/v1"

Handler = Callable[[Request, SandboxStore], Awaitable[Response]]
Methods = dict[str, tuple[str, Handler]]

_BUYER = "/buyers/{buyer_id}"
_INVOICE = "/invoices/{invoice_id}"
# Path -> method -> (required permission, handler).
_ROUTES: dict[str, Methods] = {
    "/buyers": {
        "GET": ("read", buyers.list_buyers),
        "POST": ("create", buyers.create_buyer),
    },
    _BUYER: {
        "GET": ("read", buyers.get_buyer),
        "PUT": ("update", buyers.update_buyer),
        "PATCH": ("update", buyers.update_buyer),
        "DELETE": ("delete", buyers.delete_buyer),
    },
    "/invoices": {
        "GET": ("read", invoices.list_invoices),
        "POST": ("create", invoices.create_invoice),
    },
    _INVOICE: {
        "GET": ("read", invoices.get_invoice),
        "PUT": ("update", invoices.update_invoice),
        "PATCH": ("update", invoices.update_invoice),
        "DELETE": ("delete", invoices.delete_invoice),
    },
    f"{_INVOICE}/validate": {"POST": ("update", invoices.validate_invoice_action)},
    f"{_INVOICE}/submit": {"POST": ("update", invoices.submit_invoice)},
    f"{_INVOICE}/cancel": {"POST": ("update", invoices.cancel_invoice)},
    f"{_INVOICE}/status": {"GET": ("read", invoices.invoice_status)},
}


def create_sandbox_app(
    tokens: Iterable[SandboxToken], *, rate_limit_per_minute: int = 60
) -> Starlette:
    """The sandbox ASGI app; `app.state.tokens` is the TokenRegistry, `app.state.store` the data."""
    if rate_limit_per_minute < 0:
        raise ValueError("rate_limit_per_minute must be >= 0")
    registry = TokenRegistry(tokens)
    store = SandboxStore()
    limiter = FixedWindowLimiter(rate_limit_per_minute) if rate_limit_per_minute else None
    routes = [
        Route(API_PREFIX + path, _endpoint(methods, store), methods=list(methods))
        for path, methods in _ROUTES.items()
    ]
    routes.append(Route("/login", _login_page, methods=["GET"]))
    app = Starlette(
        routes=routes,
        middleware=[Middleware(SandboxGuard, tokens=registry, limiter=limiter, clock=unix_clock())],
        exception_handlers={
            ClientDisconnect: _client_left,
            SandboxError: _sandbox_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
    # Laravel does not redirect between /buyers and /buyers/: both are plain routes or 404s.
    app.router.redirect_slashes = False
    app.state.tokens = registry
    app.state.store = store
    return app


def _endpoint(methods: Methods, store: SandboxStore) -> Callable[[Request], Awaitable[Response]]:
    by_method = {**methods, "HEAD": methods["GET"]} if "GET" in methods else dict(methods)

    async def endpoint(request: Request) -> Response:
        permission, handler = by_method[request.method]
        if permission not in scope_token(request.scope).permissions:
            raise forbidden(permission)
        return await handler(request, store)

    return endpoint


async def _login_page(request: Request) -> Response:
    return HTMLResponse("<!DOCTYPE html>\n<html><body><h1>InvoisX sandbox login</h1></body></html>")


def _client_left(request: Request, exc: Exception) -> Response:
    # Without this handler, Starlette's last-resort handler re-raises the ClientDisconnect and
    # uvicorn prints it as "Exception in ASGI application" with a traceback. uvicorn drops
    # whatever is sent after a disconnect, so this answer goes nowhere; 499 is nginx's name for
    # it, should anything ever see it.
    return Response(status_code=499)


def _sandbox_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SandboxError)
    return error_response(request.scope, exc)


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    route = request.scope["path"].lstrip("/")
    if exc.status_code == 405:
        allowed = sorted((exc.headers or {}).get("Allow", "").split(", "))
        error = SandboxError(
            405,
            "METHOD_NOT_ALLOWED",
            f"The {request.method} method is not supported for route {route}. "
            f"Supported methods: {', '.join(allowed)}.",
            headers={"Allow": ", ".join(allowed)},
        )
    elif exc.status_code == 404:
        error = SandboxError(404, "NOT_FOUND", f"The route {route} could not be found.")
    else:
        phrase = HTTPStatus(exc.status_code).phrase
        code = phrase.upper().replace(" ", "_").replace("-", "_")
        error = SandboxError(exc.status_code, code, exc.detail or phrase, headers=exc.headers)
    return error_response(request.scope, error)


def _server_error(request: Request, exc: Exception) -> Response:
    return error_response(request.scope, SandboxError(500, "SERVER_ERROR", "Server Error"))
