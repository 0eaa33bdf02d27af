"""A faithful in-memory stand-in for the InvoisX API, for the demo, tests and benchmarks.

    app = create_sandbox_app([SandboxToken(new_token_value(), "demo", frozenset({"read"}))])

Serve it with uvicorn; the upstream base URL is then `http://HOST:PORT/api/v1`.
"""

from __future__ import annotations

from proxy.sandbox.app import API_PREFIX, create_sandbox_app
from proxy.sandbox.quiet import OneLineErrors
from proxy.sandbox.store import SandboxStore
from proxy.sandbox.tokens import PERMISSIONS, SandboxToken, TokenRegistry, new_token_value

__all__ = [
    "API_PREFIX",
    "PERMISSIONS",
    "OneLineErrors",
    "SandboxStore",
    "SandboxToken",
    "TokenRegistry",
    "create_sandbox_app",
    "new_token_value",
]
