"""The optional TOML config file (`INVOISX_PROXY_CONFIG`): route-permission rules."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from proxy.policy import RuleSpec
from proxy.settings import ConfigError

__all__ = ["ConfigFile", "load_config_file"]

_SETTING = "INVOISX_PROXY_CONFIG"


class ConfigFile(BaseModel):
    """What the TOML file may hold; unknown keys are errors so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[RuleSpec, ...] = ()


def _location(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def load_config_file(path: Path | None) -> ConfigFile:
    """Parse and validate the config file; no path means an empty config."""
    if path is None:
        return ConfigFile()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(_SETTING, f"cannot read {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(_SETTING, f"{path} is not valid TOML: {error}") from None
    try:
        return ConfigFile.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(_SETTING, f"{path}: {_location(first['loc'])}: {message}") from None
