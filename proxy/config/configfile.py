"""The optional TOML config file (`INVOISX_PROXY_CONFIG`): route rules and client keys.

It is read at start-up and again whenever it changes (or on SIGHUP); a file that does not
load keeps the last good config in force. Each request takes the config once, so a reload
never mixes two configs within one call.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from structlog.typing import FilteringBoundLogger

from proxy.config.settings import ConfigError, Settings, is_loopback
from proxy.stages.clients import ANONYMOUS, CLIENT_NAME, UNIDENTIFIED, ClientKeys, ClientSpec
from proxy.stages.policy import Policy, RuleSpec
from proxy.stages.target import KNOWN_NAMES

__all__ = [
    "ActiveConfig",
    "ConfigFile",
    "ConfigHolder",
    "ConfigReload",
    "build_config",
    "load_config_file",
    "parse_config",
]

_SETTING = "INVOISX_PROXY_CONFIG"


class ConfigFile(BaseModel):
    """What the TOML file may hold; unknown keys are errors so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[RuleSpec, ...] = ()
    clients: dict[str, ClientSpec] = {}

    @field_validator("clients")
    @classmethod
    def _plain_unique_clients(cls, clients: dict[str, ClientSpec]) -> dict[str, ClientSpec]:
        for name in clients:
            if not CLIENT_NAME.fullmatch(name) or name in (ANONYMOUS.name, UNIDENTIFIED):
                raise ValueError(
                    f"client name {name!r}: use 1-64 letters, digits, '.', '_' or '-' "
                    f"(not {ANONYMOUS.name!r} or {UNIDENTIFIED!r})"
                )
        hashes = [spec.key_sha256 for spec in clients.values()]
        if len(set(hashes)) != len(hashes):
            raise ValueError("two clients share one key_sha256; give each app its own key")
        return clients


def _location(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def parse_config(text: str, source: Path) -> ConfigFile:
    """Parse and validate the file's text; `ConfigError` names the file and the bad key."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(_SETTING, f"{source} is not valid TOML: {error}") from None
    try:
        return ConfigFile.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(_SETTING, f"{source}: {_location(first['loc'])}: {message}") from None


def load_config_file(path: Path | None) -> ConfigFile:
    """Read, parse and validate the config file; no path means an empty config."""
    if path is None:
        return ConfigFile()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(_SETTING, f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(_SETTING, f"{path} is not UTF-8 text") from None
    return parse_config(text, path)


@dataclass(frozen=True, slots=True)
class ActiveConfig:
    """The config in force: the policy, the client keys and the names route templates keep."""

    policy: Policy
    clients: ClientKeys
    route_names: frozenset[str]
    rules: int


def build_config(file: ConfigFile, settings: Settings) -> ActiveConfig:
    """Compile `file` for use; refuses an open proxy on a non-loopback address unless allowed."""
    if not file.clients and not is_loopback(settings.host) and not settings.allow_anonymous:
        raise ConfigError(
            "INVOISX_PROXY_ALLOW_ANONYMOUS",
            f"listening on {settings.host} without client keys lets anyone who can reach it "
            "use the token; add [clients] to INVOISX_PROXY_CONFIG or set this to true",
        )
    reserved = sum(spec.reserved_per_minute or 0 for spec in file.clients.values())
    if reserved and reserved > settings.rate_limit_per_minute > 0:
        raise ConfigError(
            _SETTING,
            f"the clients' reserved_per_minute add up to {reserved}, more than the token's "
            f"limit of {settings.rate_limit_per_minute} (INVOISX_RATE_LIMIT_PER_MINUTE)",
        )
    policy = Policy(granted=settings.token_permissions, rules=file.rules)
    return ActiveConfig(
        policy=policy,
        clients=ClientKeys(file.clients),
        route_names=KNOWN_NAMES | policy.route_names,
        rules=len(file.rules),
    )


class ConfigHolder:
    """The config in force now; a reload replaces it whole."""

    def __init__(self, config: ActiveConfig) -> None:
        self.current = config


class ConfigReload:
    """Turns each change of the config file into a swap, or into a logged refusal."""

    def __init__(
        self,
        holder: ConfigHolder,
        path: Path,
        settings: Settings,
        *,
        log: FilteringBoundLogger,
    ) -> None:
        self._holder = holder
        self._path = path
        self._settings = settings
        self._log = log

    def on_change(self, content: bytes | OSError) -> None:
        """Load `content` (the file's bytes, or why it could not be read)."""
        try:
            if isinstance(content, OSError):
                raise ConfigError(_SETTING, f"cannot read {self._path}: {content.strerror}")
            file = parse_config(content.decode("utf-8", "replace"), self._path)
            config = build_config(file, self._settings)
        except ConfigError as error:
            self._log.error("config_reload_failed", reason=str(error))
            return
        self._holder.current = config
        self._log.warning("config_reloaded", clients=len(config.clients), rules=config.rules)
