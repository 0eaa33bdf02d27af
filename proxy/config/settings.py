"""Settings: read once from the environment (and `.env`), validated, then passed around.

The variable names are the public contract (docs/settings.md, `config/example.env`). A bad
value stops start-up with one line naming the variable, via `ConfigError`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from proxy.stages.policy import Permission, parse_permissions

__all__ = [
    "MALAYSIA_TIME",
    "ConfigError",
    "Settings",
    "UnknownVariable",
    "find_unknown_variables",
    "is_loopback",
    "known_variables",
    "load_settings",
    "parse_expiry",
]

# InvoisX is a Malaysian service; Malaysia keeps UTC+8 all year, so a fixed offset is exact.
MALAYSIA_TIME = timezone(timedelta(hours=8), "MYT")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class ConfigError(Exception):
    """A setting that stops start-up; `str()` is the one line shown to the operator."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP addresses (IPv4 127/8, IPv6 ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_expiry(value: str) -> datetime:
    """An expiry as written by an operator: a bare date is the end of that day, Malaysia time."""
    value = value.strip()
    if _DATE.fullmatch(value):
        # The day shown in the dashboard: valid through that day.
        return datetime.combine(
            date.fromisoformat(value) + timedelta(days=1), time(), MALAYSIA_TIME
        )
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=MALAYSIA_TIME)


@dataclass(frozen=True, slots=True)
class UnknownVariable:
    """An `INVOISX_*` variable that names no setting, and the setting it most likely meant."""

    name: str
    source: str
    closest: str | None


class Settings(BaseSettings):
    """Every setting of the proxy, from `INVOISX_*` environment variables or `.env`."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", populate_by_name=True, hide_input_in_errors=True
    )

    api_token: SecretStr | None = Field(None, validation_alias="INVOISX_API_TOKEN")
    api_token_file: Path | None = Field(None, validation_alias="INVOISX_API_TOKEN_FILE")
    api_url: str = Field("https://invoisx.com/api/v1", validation_alias="INVOISX_API_URL")
    allow_insecure_upstream: bool = Field(
        False, validation_alias="INVOISX_PROXY_ALLOW_INSECURE_UPSTREAM"
    )
    token_permissions: Annotated[frozenset[Permission], NoDecode] = Field(
        frozenset({Permission.READ}), validation_alias="INVOISX_TOKEN_PERMISSIONS"
    )
    token_expires_at: datetime | None = Field(None, validation_alias="INVOISX_TOKEN_EXPIRES_AT")
    host: str = Field("127.0.0.1", validation_alias="INVOISX_PROXY_HOST", min_length=1)
    allow_anonymous: bool = Field(False, validation_alias="INVOISX_PROXY_ALLOW_ANONYMOUS")
    port: int = Field(8080, validation_alias="INVOISX_PROXY_PORT", ge=0, le=65535)
    config: Path | None = Field(None, validation_alias="INVOISX_PROXY_CONFIG")
    log_file: Path | None = Field(None, validation_alias="INVOISX_PROXY_LOG_FILE")
    upstream_timeout: float = Field(30.0, validation_alias="INVOISX_PROXY_UPSTREAM_TIMEOUT", gt=0)
    client_timeout: float = Field(10.0, validation_alias="INVOISX_PROXY_CLIENT_TIMEOUT", gt=0)
    max_upstream_connections: int = Field(
        64, validation_alias="INVOISX_PROXY_MAX_UPSTREAM_CONNECTIONS", ge=1, le=10_000
    )
    max_body_bytes: int = Field(10_485_760, validation_alias="INVOISX_PROXY_MAX_BODY_BYTES", ge=0)
    max_buffered_bytes: int = Field(
        67_108_864, validation_alias="INVOISX_PROXY_MAX_BUFFERED_BYTES", ge=0
    )
    max_header_bytes: int = Field(
        32_768, validation_alias="INVOISX_PROXY_MAX_HEADER_BYTES", ge=1024
    )
    keepalive_timeout: float = Field(
        120.0, validation_alias="INVOISX_PROXY_KEEPALIVE_TIMEOUT", gt=0, le=3600
    )
    max_idle_connections: int = Field(
        1000, validation_alias="INVOISX_PROXY_MAX_IDLE_CONNECTIONS", ge=1, le=1_000_000
    )
    expiry_warning_days: int = Field(
        30, validation_alias="INVOISX_TOKEN_EXPIRY_WARNING_DAYS", ge=0, le=3650
    )
    reload_interval: float = Field(
        2.0, validation_alias="INVOISX_PROXY_RELOAD_INTERVAL", gt=0, le=3600
    )
    ready_probe_interval: float = Field(
        0.0, validation_alias="INVOISX_PROXY_READY_PROBE_INTERVAL", ge=0
    )
    shutdown_grace: float = Field(20.0, validation_alias="INVOISX_PROXY_SHUTDOWN_GRACE", ge=0)
    rate_limit_per_minute: int = Field(60, validation_alias="INVOISX_RATE_LIMIT_PER_MINUTE", ge=0)
    rate_limit_max_wait: float = Field(10.0, validation_alias="INVOISX_RATE_LIMIT_MAX_WAIT", ge=0)
    rate_limit_max_queue: int = Field(1000, validation_alias="INVOISX_RATE_LIMIT_MAX_QUEUE", ge=0)
    retry_max: int = Field(2, validation_alias="INVOISX_RETRY_MAX", ge=0, le=10)
    # A secret: the URL may carry Redis's password.
    redis_url: SecretStr | None = Field(None, validation_alias="INVOISX_PROXY_REDIS_URL")
    redis_prefix: str = Field(
        "invoisx-proxy:", validation_alias="INVOISX_PROXY_REDIS_PREFIX", min_length=1
    )
    redis_timeout: float = Field(0.05, validation_alias="INVOISX_PROXY_REDIS_TIMEOUT", gt=0, le=5)
    idempotency_ttl: float = Field(86_400.0, validation_alias="INVOISX_IDEMPOTENCY_TTL", gt=0)
    idempotency_max_entries: int = Field(
        10_000, validation_alias="INVOISX_IDEMPOTENCY_MAX_ENTRIES", ge=1
    )
    idempotency_max_bytes: int = Field(
        67_108_864, validation_alias="INVOISX_IDEMPOTENCY_MAX_BYTES", ge=0
    )

    # What `load_settings` found in the environment that no setting reads (start-up warns).
    _unknown: tuple[UnknownVariable, ...] = PrivateAttr(default=())

    @property
    def unknown_variables(self) -> tuple[UnknownVariable, ...]:
        """The `INVOISX_*` variables set that no setting reads, each with its likely meaning."""
        return self._unknown

    @property
    def permissions_defaulted(self) -> bool:
        """True when INVOISX_TOKEN_PERMISSIONS was not set and the token runs read-only."""
        return "token_permissions" not in self.model_fields_set

    @field_validator("token_permissions", mode="before")
    @classmethod
    def _split_permissions(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        permissions = parse_permissions(value)
        if not permissions:
            raise ValueError("name at least one of create, read, update, delete")
        return permissions

    @field_validator("token_expires_at", mode="before")
    @classmethod
    def _date_means_end_of_day(cls, value: Any) -> Any:
        if isinstance(value, str) and _DATE.fullmatch(value.strip()):
            return parse_expiry(value)
        return value

    @field_validator("ready_probe_interval")
    @classmethod
    def _probe_rarely(cls, value: float) -> float:
        # Every probe spends one of the token's 60 calls a minute.
        if 0 < value < 60:
            raise ValueError("must be 0 (off) or at least 60 seconds")
        return value

    @field_validator("token_expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=MALAYSIA_TIME)
        return value

    @field_validator("api_url")
    @classmethod
    def _plain_base_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL such as https://invoisx.com/api/v1")
        if any(char <= " " or char == "\x7f" for char in value.strip()):
            raise ValueError("must not contain spaces or control characters (percent-encode them)")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("must not contain credentials, a query string or a fragment")
        # urlsplit lowercases the scheme; keep that form so later checks cannot miss `HTTP://`.
        return parts._replace(path=parts.path.rstrip("/")).geturl()

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        url = value.get_secret_value().strip()
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises for a port that is no number)
        except ValueError:
            raise ValueError("is not a URL such as redis://127.0.0.1:6379/0") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if parts.scheme == "unix" and not parts.path:
            raise ValueError("must name the socket, as in unix:///run/redis/redis.sock")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("must name the host, as in redis://127.0.0.1:6379/0")
        if parts.scheme != "unix" and not re.fullmatch(r"(/[0-9]*)?", parts.path):
            # redis-py would quietly use database 0 instead.
            raise ValueError("must end with a database number, as in redis://127.0.0.1:6379/0")
        return SecretStr(url)

    @model_validator(mode="after")
    def _secure_upstream(self) -> Settings:
        parts = urlsplit(self.api_url)
        host = parts.hostname or ""
        if parts.scheme == "http" and not (is_loopback(host) or self.allow_insecure_upstream):
            raise ValueError(
                "INVOISX_API_URL: plain http:// is only allowed to a loopback host; "
                "use https:// or set INVOISX_PROXY_ALLOW_INSECURE_UPSTREAM=true"
            )
        return self

    @model_validator(mode="after")
    def _one_token_source(self) -> Settings:
        if self.api_token is None and self.api_token_file is None:
            raise ValueError("INVOISX_API_TOKEN: set it, or INVOISX_API_TOKEN_FILE, to the token")
        if self.api_token is not None and self.api_token_file is not None:
            raise ValueError("INVOISX_API_TOKEN: set either it or INVOISX_API_TOKEN_FILE, not both")
        return self


# Words of letters, as every setting's name is; anything else may hold a pasted secret.
_PLAIN_NAME = re.compile(r"INVOISX(_[A-Za-z]{1,16}){1,6}")
_NOT_SHOWN = "INVOISX_... (not shown: it may be a secret)"


def known_variables() -> frozenset[str]:
    """Every variable name the settings read."""
    return frozenset(str(field.validation_alias) for field in Settings.model_fields.values())


def find_unknown_variables(
    environ: Mapping[str, str], env_file: str | None
) -> tuple[UnknownVariable, ...]:
    """The `INVOISX_*` names in `environ` and `env_file` that no setting reads.

    A typo such as INVOISX_TOKEN_PERMISSION would otherwise be ignored without a word, and
    the proxy would run with the default it was meant to replace. Values are never read out.
    """
    known = known_variables()
    sources = [("environment", list(environ))]
    if env_file is not None and Path(env_file).is_file():
        sources.append((env_file, _dotenv_names(env_file)))
    found: list[UnknownVariable] = []
    for source, names in sources:
        for name in sorted(names):
            upper = name.upper()
            if upper.startswith("INVOISX_") and upper not in known:
                closest = get_close_matches(upper, known, n=1, cutoff=0.6)
                # A name is echoed only when it reads like one: `.env`'s
                # `INVOISX_API_TOKEN:ixs_...` is all name to dotenv, the token included.
                shown = name if _PLAIN_NAME.fullmatch(name) else _NOT_SHOWN
                found.append(UnknownVariable(shown, source, closest[0] if closest else None))
    return tuple(found)


def _dotenv_names(env_file: str) -> list[str]:
    # pydantic-settings has parsed the file already and warned about any bad line once.
    dotenv_log = logging.getLogger("dotenv.main")
    was_disabled, dotenv_log.disabled = dotenv_log.disabled, True
    try:
        return list(dotenv_values(env_file))
    finally:
        dotenv_log.disabled = was_disabled


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"]:
        return message  # model-level checks already name their variable
    field = Settings.model_fields.get(str(first["loc"][0]))
    name = field.validation_alias if field and field.validation_alias else first["loc"][0]
    return f"{name}: {message}"


def load_settings(env_file: str | None = ".env", **overrides: Any) -> Settings:
    """Build settings from the environment, `env_file` and `overrides` (CLI flags win)."""
    try:
        settings = Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as error:
        line = _one_line(error)
        setting, _, message = line.partition(": ")
        raise ConfigError(setting, message) from None
    settings._unknown = find_unknown_variables(os.environ, env_file)
    return settings
