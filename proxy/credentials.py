"""The server-held InvoisX token: loaded once, sent only upstream, shown only as a fingerprint."""

from __future__ import annotations

import hashlib
from pathlib import Path

from proxy.settings import ConfigError, Settings

__all__ = ["UpstreamToken", "fingerprint", "load_token"]


def fingerprint(secret: str) -> str:
    """First 12 hex characters of the secret's sha256: enough to tell tokens apart in logs."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


class UpstreamToken:
    """The token, its fingerprint and the ready-made Authorization header; repr hides it."""

    __slots__ = ("authorization", "fingerprint")

    def __init__(self, secret: str) -> None:
        self.fingerprint = fingerprint(secret)
        self.authorization = f"Bearer {secret}".encode()

    def __repr__(self) -> str:
        return f"UpstreamToken(fingerprint={self.fingerprint!r})"


def _checked(secret: str, setting: str) -> str:
    secret = secret.strip()
    if not secret:
        raise ConfigError(setting, "the token is empty")
    # A header value must be visible ASCII; anything else would corrupt or split the header.
    if not all("!" <= char <= "~" for char in secret):
        raise ConfigError(setting, "the token contains spaces or characters outside ASCII")
    return secret


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError("INVOISX_API_TOKEN_FILE", f"cannot read {path}: {reason}") from None


def load_token(settings: Settings) -> UpstreamToken:
    """The token from `INVOISX_API_TOKEN` or the file named by `INVOISX_API_TOKEN_FILE`."""
    if settings.api_token_file is not None:
        secret = _checked(_read_file(settings.api_token_file), "INVOISX_API_TOKEN_FILE")
    else:
        assert settings.api_token is not None  # Settings requires one of the two
        secret = _checked(settings.api_token.get_secret_value(), "INVOISX_API_TOKEN")
    return UpstreamToken(secret)
