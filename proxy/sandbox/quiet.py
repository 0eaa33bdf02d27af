"""`OneLineErrors`: a sandbox failure as one log line, never a traceback among the demo's lines."""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["OneLineErrors"]

# uvicorn's own error logger, so the line takes the shape the serving process gives uvicorn's.
_log = logging.getLogger("uvicorn.error")


class OneLineErrors:
    """Wraps the sandbox app as the CLI serves it; an exception it lets out is logged as one line.

    uvicorn would print it as "Exception in ASGI application" and a traceback, in the middle of
    the demo's audit lines. Starlette's ServerErrorMiddleware has answered 500 before the
    exception gets here, so only the traceback is lost; the tests serve the bare app and keep it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        # Broad on purpose: whatever the stand-in got wrong, the demo's output stays readable,
        # and the line still says what failed where.
        except Exception as error:
            _log.error(
                "sandbox error on %s %s: %s: %s",
                scope.get("method", scope["type"]),
                scope.get("path", ""),
                type(error).__name__,
                error,
            )
