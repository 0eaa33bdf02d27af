"""The sandbox's error type and how it is rendered, JSON or Laravel-like.

A client that sends `Accept: application/json` gets the InvoisX envelope
`{"success": false, "message": ..., "error_code": ..., "errors"?: {...}}`. Any other client gets
what a Laravel backend answers a browser: authentication failures (401) redirect to `/login`,
validation failures (422) redirect back to the Referer (or `/`), anything else is an HTML page
with the real status. Success responses are JSON whatever the Accept header says.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from http import HTTPStatus

from starlette.datastructures import Headers
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import Scope

__all__ = [
    "FieldErrors",
    "SandboxError",
    "document_not_found",
    "error_response",
    "forbidden",
    "validation_failed",
    "wants_json",
]

FieldErrors = dict[str, list[str]]


class SandboxError(Exception):
    """An API error: HTTP status, InvoisX error code and message travel together."""

    def __init__(
        self,
        status_code: int,
        error_code: str,
        message: str,
        *,
        errors: FieldErrors | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_code = error_code
        self.message = message
        self.errors = errors
        self.headers = dict(headers or {})


def validation_failed(errors: FieldErrors) -> SandboxError:
    """422 VALIDATION_FAILED carrying the field -> messages map."""
    return SandboxError(422, "VALIDATION_FAILED", "The given data was invalid.", errors=errors)


def document_not_found(kind: str) -> SandboxError:
    """404 DOCUMENT_NOT_FOUND for a buyer or invoice id that is not in the store."""
    return SandboxError(404, "DOCUMENT_NOT_FOUND", f"{kind} not found.")


def forbidden(permission: str) -> SandboxError:
    """403 FORBIDDEN naming the permission the token lacks."""
    return SandboxError(
        403, "FORBIDDEN", f"This action requires the '{permission}' permission on the API token."
    )


def wants_json(headers: Headers) -> bool:
    """Whether the client asked for JSON (only an Accept value naming application/json counts)."""
    return "application/json" in headers.get("accept", "").lower()


def error_response(scope: Scope, error: SandboxError) -> Response:
    """Render `error` for this request: the JSON envelope or Laravel's browser behaviour."""
    headers = Headers(scope=scope)
    if wants_json(headers):
        body: dict[str, object] = {
            "success": False,
            "message": error.message,
            "error_code": error.error_code,
        }
        if error.errors is not None:
            body["errors"] = error.errors
        return JSONResponse(body, error.status_code, headers=error.headers)
    base = _base_url(scope, headers)
    if error.status_code == 401:
        return _redirect(f"{base}/login", error.headers)
    if error.status_code == 422:
        return _redirect(headers.get("referer") or f"{base}/", error.headers)
    return _html_page(error.status_code, error.headers)


def _base_url(scope: Scope, headers: Headers) -> str:
    host = headers.get("host")
    if not host:
        server = scope.get("server") or ("127.0.0.1", 80)
        host = f"{server[0]}:{server[1]}"
    return f"{scope.get('scheme', 'http')}://{host}"


def _redirect(location: str, extra_headers: Mapping[str, str]) -> Response:
    url = html.escape(location)
    body = (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="UTF-8" />\n'
        f'<meta http-equiv="refresh" content="0;url=\'{url}\'" />\n'
        f"<title>Redirecting to {url}</title>\n</head>\n"
        f'<body>Redirecting to <a href="{url}">{url}</a>.</body>\n</html>\n'
    )
    return HTMLResponse(body, 302, headers={**extra_headers, "Location": location})


def _html_page(status_code: int, extra_headers: Mapping[str, str]) -> Response:
    reason = HTTPStatus(status_code).phrase
    body = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{reason}</title>\n</head>\n"
        f"<body><div>{status_code} | {reason}</div></body>\n</html>\n"
    )
    return HTMLResponse(body, status_code, headers=extra_headers)
