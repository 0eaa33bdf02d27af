"""Client keys: random secrets an internal app sends instead of the InvoisX token.

The proxy stores only their sha256, so its config file reveals nothing that could call it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

__all__ = ["KEY_PREFIX", "config_block", "key_sha256", "new_key"]

# Recognisable in a leaked file or a secret scanner, and never mistaken for an InvoisX token.
KEY_PREFIX = "ipk_"


def new_key() -> str:
    """A new client key: 256 random bits, URL-safe, fit for an Authorization header."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_sha256(key: str) -> str:
    """The hex sha256 of a key, as written in the config file."""
    return hashlib.sha256(key.encode()).hexdigest()


def config_block(name: str, key: str, permissions: Iterable[str]) -> str:
    """The `[clients.NAME]` TOML table that lets `key` in with `permissions`."""
    listed = ", ".join(f'"{permission}"' for permission in sorted(permissions))
    return f'[clients.{name}]\nkey_sha256 = "{key_sha256(key)}"\npermissions = [{listed}]\n'
