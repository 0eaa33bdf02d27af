"""Who is calling: the client identity that the audit log and (later) per-client policy use."""

from __future__ import annotations

from starlette.types import Scope

__all__ = ["peer_address"]


def peer_address(scope: Scope) -> str:
    """The TCP peer's address, or `unknown` when the server does not report one."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"
