"""The server-held InvoisX token: loaded, swapped on rotation, shown only as a fingerprint."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

from proxy.config.settings import ConfigError, Settings, parse_expiry

__all__ = [
    "TOKEN_LEVEL_ERRORS",
    "TokenHolder",
    "UpstreamToken",
    "fingerprint",
    "load_token",
    "parse_token_file",
    "read_token_file",
]

# InvoisX error codes that condemn the token itself (revoked, expired early, lost its company),
# as opposed to one request lacking a permission.
TOKEN_LEVEL_ERRORS = frozenset({"UNAUTHORIZED", "TOKEN_EXPIRED", "COMPANY_ACCESS_DENIED"})
_EXPIRES_KEY = "expires_at="


def fingerprint(secret: str) -> str:
    """First 12 hex characters of the secret's sha256: enough to tell tokens apart in logs."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


class UpstreamToken:
    """The token, its fingerprint, expiry and ready-made Authorization value; repr hides it."""

    __slots__ = ("authorization", "expires_at", "fingerprint")

    def __init__(self, secret: str, expires_at: datetime | None = None) -> None:
        self.fingerprint = fingerprint(secret)
        self.authorization = f"Bearer {secret}".encode()
        self.expires_at = expires_at

    def __repr__(self) -> str:
        return f"UpstreamToken(fingerprint={self.fingerprint!r})"


class TokenHolder:
    """The token in use now. A rotation replaces it whole, so a request that took the token
    once uses that token throughout, never half of two."""

    def __init__(self, token: UpstreamToken) -> None:
        self.current = token
        # Set when InvoisX refuses the current token itself; a new token clears it.
        self.rejected = False

    def swap(self, token: UpstreamToken) -> None:
        """Put `token` in use, with no verdict from InvoisX yet."""
        self.current, self.rejected = token, False

    def reject(self, token: UpstreamToken) -> bool:
        """Record InvoisX's refusal of `token`; False when it is no longer the current one."""
        if token is not self.current or self.rejected:
            return False
        self.rejected = True
        return True


def _checked(secret: str, setting: str) -> str:
    secret = secret.strip()
    if not secret:
        raise ConfigError(setting, "the token is empty")
    # A header value must be visible ASCII; anything else would corrupt or split the header.
    if not all("!" <= char <= "~" for char in secret):
        raise ConfigError(setting, "the token contains spaces or characters outside ASCII")
    return secret


def parse_token_file(text: str) -> UpstreamToken:
    """The token file: the token on its first line, optionally `expires_at=DATE` on the next.

    The expiry line lets a rotated token bring its own expiry; a bare date means the end of
    that day, Malaysia time. Raises `ConfigError` naming INVOISX_API_TOKEN_FILE.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError("INVOISX_API_TOKEN_FILE", "the token is empty")
    secret = _checked(lines[0], "INVOISX_API_TOKEN_FILE")
    expires_at = None
    for line in lines[1:]:
        if not line.startswith(_EXPIRES_KEY):
            raise ConfigError(
                "INVOISX_API_TOKEN_FILE", "only an expires_at=DATE line may follow the token"
            )
        try:
            expires_at = parse_expiry(line.removeprefix(_EXPIRES_KEY))
        except ValueError:
            raise ConfigError("INVOISX_API_TOKEN_FILE", "expires_at is not a date") from None
    return UpstreamToken(secret, expires_at)


def read_token_file(path: Path) -> UpstreamToken:
    """Read and parse the token file; `ConfigError` when it cannot be read or is invalid."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError("INVOISX_API_TOKEN_FILE", f"cannot read {path}: {reason}") from None
    return parse_token_file(text)


def load_token(settings: Settings, now: datetime) -> UpstreamToken:
    """The start-up token from `INVOISX_API_TOKEN` or `INVOISX_API_TOKEN_FILE`.

    INVOISX_TOKEN_EXPIRES_AT describes this token; an expiry line in the file wins over it.
    An expired token from the file starts (a rotation can replace it, start-up logs
    `token_expired`); an expired INVOISX_API_TOKEN cannot change without a restart, so a
    proxy that could only answer 401 does not start.
    """
    if settings.api_token_file is not None:
        token = read_token_file(settings.api_token_file)
        if token.expires_at is None:
            token.expires_at = settings.token_expires_at
        return token
    assert settings.api_token is not None  # Settings requires one of the two
    secret = _checked(settings.api_token.get_secret_value(), "INVOISX_API_TOKEN")
    expires_at = settings.token_expires_at
    if expires_at is not None and expires_at <= now:
        raise ConfigError(
            "INVOISX_TOKEN_EXPIRES_AT",
            f"the token expired at {expires_at.isoformat()}; put a new token in "
            "INVOISX_API_TOKEN (or use INVOISX_API_TOKEN_FILE, which is reloaded on change)",
        )
    return UpstreamToken(secret, expires_at)
