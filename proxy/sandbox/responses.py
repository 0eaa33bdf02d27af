"""Success responses in the InvoisX envelope: `{"success": true, "data": ..., "meta"?: ...}`."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

__all__ = ["no_content", "success"]


def success(data: Any, status_code: int = 200, meta: dict[str, Any] | None = None) -> Response:
    """`data` (and list `meta`) wrapped in the success envelope."""
    body: dict[str, Any] = {"success": True, "data": data}
    if meta is not None:
        body["meta"] = meta
    return JSONResponse(body, status_code)


def no_content() -> Response:
    """204 with an empty body, as InvoisX answers a DELETE."""
    return Response(status_code=204)
