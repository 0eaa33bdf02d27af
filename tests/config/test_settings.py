"""Settings, the token and the config file: validated once, bad values named in one line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from proxy.config.configfile import load_config_file
from proxy.config.credentials import load_token
from proxy.config.settings import (
    ConfigError,
    find_unknown_variables,
    known_variables,
    load_settings,
)
from proxy.stages.policy import Permission
from tests.conftest import TOKEN

NOW = datetime(2026, 12, 2, tzinfo=UTC)


def settings(**values: Any) -> Any:
    return load_settings(env_file=None, **({"api_token": TOKEN} | values))


def test_defaults() -> None:
    loaded = settings()
    assert loaded.api_url == "https://invoisx.com/api/v1"
    assert loaded.token_permissions == {Permission.READ}
    assert (loaded.host, loaded.port) == ("127.0.0.1", 8080)
    assert loaded.upstream_timeout == 30
    assert loaded.max_body_bytes == 10_485_760
    assert loaded.token_expires_at is None


def test_environment_names_are_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "INVOISX_API_TOKEN": TOKEN,
        "INVOISX_API_URL": "https://sandbox.invalid/api/v1/",
        "INVOISX_TOKEN_PERMISSIONS": "read, Create",
        "INVOISX_TOKEN_EXPIRES_AT": "2027-03-31T17:00:00+08:00",
        "INVOISX_PROXY_HOST": "0.0.0.0",
        "INVOISX_PROXY_PORT": "9000",
        "INVOISX_PROXY_CONFIG": "/etc/proxy.toml",
        "INVOISX_PROXY_LOG_FILE": "/var/log/audit.log",
        "INVOISX_PROXY_UPSTREAM_TIMEOUT": "2.5",
        "INVOISX_PROXY_MAX_BODY_BYTES": "1000",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    loaded = load_settings(env_file=None)
    assert loaded.api_url == "https://sandbox.invalid/api/v1"
    assert loaded.token_permissions == {Permission.READ, Permission.CREATE}
    assert loaded.token_expires_at == datetime(2027, 3, 31, 9, 0, tzinfo=UTC)
    assert (loaded.host, loaded.port) == ("0.0.0.0", 9000)
    assert loaded.config == Path("/etc/proxy.toml")
    assert loaded.log_file == Path("/var/log/audit.log")
    assert (loaded.upstream_timeout, loaded.max_body_bytes) == (2.5, 1000)


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"INVOISX_API_TOKEN={TOKEN}\nINVOISX_PROXY_PORT=9100\n")
    loaded = load_settings(env_file=str(env_file))
    assert loaded.port == 9100
    assert load_token(loaded, NOW).fingerprint == load_token(settings(), NOW).fingerprint


def test_cli_overrides_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVOISX_PROXY_PORT", "9000")
    assert settings(port=9001).port == 9001


def test_date_expiry_means_end_of_that_day_in_malaysia() -> None:
    loaded = settings(token_expires_at="2027-01-31")
    assert loaded.token_expires_at == datetime(2027, 1, 31, 16, 0, tzinfo=UTC)
    naive = settings(token_expires_at="2027-01-31T12:00:00")
    assert naive.token_expires_at == datetime(2027, 1, 31, 4, 0, tzinfo=UTC)
    assert naive.token_expires_at.utcoffset() == timedelta(hours=8)


@pytest.mark.parametrize(
    ("values", "line"),
    [
        (
            {"token_permissions": "read,admin"},
            "INVOISX_TOKEN_PERMISSIONS: unknown permission 'admin'",
        ),
        ({"token_permissions": " , "}, "INVOISX_TOKEN_PERMISSIONS: name at least one"),
        (
            {"token_permissions": f"read,{TOKEN}"},
            "INVOISX_TOKEN_PERMISSIONS: unknown permission (not shown: it may be a secret)",
        ),
        ({"api_url": "http://invoisx.example/api/v1"}, "INVOISX_API_URL: plain http://"),
        ({"api_url": "invoisx.com/api/v1"}, "INVOISX_API_URL: must be an absolute"),
        ({"api_url": "https://u:p@invoisx.com/api/v1"}, "INVOISX_API_URL: must not contain"),
        ({"api_url": "https://invoisx.com/api/v1?x=1"}, "INVOISX_API_URL: must not contain"),
        ({"api_url": "https://invoisx.com/api v1"}, "INVOISX_API_URL: must not contain spaces"),
        ({"port": "http"}, "INVOISX_PROXY_PORT: "),
        ({"port": 70000}, "INVOISX_PROXY_PORT: "),
        ({"upstream_timeout": 0}, "INVOISX_PROXY_UPSTREAM_TIMEOUT: "),
        ({"max_upstream_connections": 0}, "INVOISX_PROXY_MAX_UPSTREAM_CONNECTIONS: "),
        ({"max_body_bytes": -1}, "INVOISX_PROXY_MAX_BODY_BYTES: "),
        ({"client_timeout": 0}, "INVOISX_PROXY_CLIENT_TIMEOUT: "),
        ({"max_buffered_bytes": -1}, "INVOISX_PROXY_MAX_BUFFERED_BYTES: "),
        ({"token_expires_at": "next year"}, "INVOISX_TOKEN_EXPIRES_AT: "),
        ({"allow_insecure_upstream": "maybe"}, "INVOISX_PROXY_ALLOW_INSECURE_UPSTREAM: "),
        ({"api_token": None}, "INVOISX_API_TOKEN: set it, or INVOISX_API_TOKEN_FILE"),
        ({"api_token_file": "/run/secrets/token"}, "INVOISX_API_TOKEN: set either it"),
        ({"redis_url": "http://redis:6379"}, "INVOISX_PROXY_REDIS_URL: must start with redis://"),
        ({"redis_url": "redis://:6379/0"}, "INVOISX_PROXY_REDIS_URL: must name the host"),
        ({"redis_url": "redis://redis:port/0"}, "INVOISX_PROXY_REDIS_URL: is not a URL"),
        ({"redis_url": "unix://"}, "INVOISX_PROXY_REDIS_URL: must name the socket"),
        ({"redis_url": "redis://redis/cache"}, "INVOISX_PROXY_REDIS_URL: must end with a database"),
        ({"redis_timeout": 0}, "INVOISX_PROXY_REDIS_TIMEOUT: "),
    ],
)
def test_bad_settings_name_the_variable(values: dict[str, Any], line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(**values)
    assert str(caught.value).startswith(line)
    assert "\n" not in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_uppercase_scheme_is_still_plain_http() -> None:
    with pytest.raises(ConfigError, match="INVOISX_API_URL: plain http://"):
        settings(api_url="HTTP://invoisx.example/api/v1")
    assert settings(api_url="HTTPS://invoisx.com/api/v1/").api_url == "https://invoisx.com/api/v1"


def test_unix_timestamp_expiry() -> None:
    loaded = settings(token_expires_at="1735689600")
    assert loaded.token_expires_at == datetime(2025, 1, 1, tzinfo=UTC)


def test_insecure_upstream_allowed_for_loopback_or_when_asked() -> None:
    assert settings(api_url="http://127.0.0.1:8000/api/v1").api_url.startswith("http://")
    assert settings(api_url="http://localhost/api/v1").api_url.startswith("http://")
    assert settings(api_url="http://[::1]:81/api/v1").api_url.startswith("http://")
    loaded = settings(api_url="http://invoisx.internal/api/v1", allow_insecure_upstream=True)
    assert loaded.api_url == "http://invoisx.internal/api/v1"


def test_token_is_never_in_repr() -> None:
    loaded = settings()
    token = load_token(loaded, NOW)
    assert TOKEN not in repr(loaded) and TOKEN not in str(loaded)
    assert TOKEN not in repr(token)
    assert token.authorization == f"Bearer {TOKEN}".encode()
    assert len(token.fingerprint) == 12


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    loaded = load_settings(env_file=None, api_token_file=path)
    assert load_token(loaded, NOW).authorization == f"Bearer {TOKEN}".encode()


def test_token_file_expiry_line_wins_over_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\nexpires_at=2027-11-30\n")
    loaded = load_settings(
        env_file=None, api_token_file=path, token_expires_at="2026-12-31T00:00:00Z"
    )
    # A bare date is the end of that day in Malaysia: 2027-11-30 16:00 UTC.
    assert load_token(loaded, NOW).expires_at == datetime(2027, 11, 30, 16, 0, tzinfo=UTC)
    path.write_text(TOKEN)
    assert load_token(loaded, NOW).expires_at == datetime(2026, 12, 31, tzinfo=UTC)


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (None, "INVOISX_API_TOKEN_FILE: cannot read"),
        ("\n", "INVOISX_API_TOKEN_FILE: the token is empty"),
        ("two words", "INVOISX_API_TOKEN_FILE: the token contains spaces"),
        ("tok\r\nX-Evil: 1", "INVOISX_API_TOKEN_FILE: only an expires_at=DATE line may follow"),
        ("tok\nexpires_at=soon", "INVOISX_API_TOKEN_FILE: expires_at is not a date"),
    ],
)
def test_bad_token_file(tmp_path: Path, content: str | None, line: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    loaded = load_settings(env_file=None, api_token_file=path)
    with pytest.raises(ConfigError, match=line):
        load_token(loaded, NOW)


def test_config_file_rules(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('[[rules]]\nmethod = "post"\npath = "/x/*"\npermission = "update"\n')
    config = load_config_file(path)
    assert [(rule.method, rule.path, rule.permission) for rule in config.rules] == [
        ("POST", "/x/*", Permission.UPDATE)
    ]
    assert load_config_file(None).rules == ()


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (None, "cannot read"),
        ("rules = [", "is not valid TOML"),
        ("[[rules]]\nmethod='GET'\npath='/x'\npermission='admin'\n", "rules[0].permission:"),
        ("[[rule]]\nmethod='GET'\n", "rule: Extra inputs are not permitted"),
        ("[[rules]]\nmethod='GET'\npath='x'\npermission='read'\n", "must start with '/'"),
    ],
)
def test_bad_config_file_names_the_setting(tmp_path: Path, content: str | None, line: str) -> None:
    path = tmp_path / "proxy.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    assert str(caught.value).startswith("INVOISX_PROXY_CONFIG: ")
    assert line in str(caught.value)
    assert "\n" not in str(caught.value)


def test_every_setting_is_documented_and_in_the_template() -> None:
    root = Path(__file__).resolve().parents[2]
    reference = (root / "docs" / "settings.md").read_text()
    template = (root / "config" / "example.env").read_text()
    for name in known_variables():
        assert f"| `{name}` |" in reference, name
        assert f"{name}=" in template, name


def test_unknown_variables_name_the_closest_setting(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("INVOISX_PROXY_PROT=9000\nINVOISX_API_TOKEN=x\nOTHER=1\n")
    environ = {
        "INVOISX_TOKEN_PERMISSION": "read,create",
        "invoisx_proxy_host": "0.0.0.0",  # read case-insensitively, so known
        "INVOISX_SOMETHING_ELSE_ENTIRELY": "1",
        "PATH": "/usr/bin",
    }
    found = find_unknown_variables(environ, str(dotenv))
    assert [(item.name, item.source, item.closest) for item in found] == [
        ("INVOISX_SOMETHING_ELSE_ENTIRELY", "environment", None),
        ("INVOISX_TOKEN_PERMISSION", "environment", "INVOISX_TOKEN_PERMISSIONS"),
        ("INVOISX_PROXY_PROT", str(dotenv), "INVOISX_PROXY_PORT"),
    ]
    assert find_unknown_variables({}, str(tmp_path / "missing.env")) == ()


def test_an_unknown_name_that_may_hold_a_secret_is_not_shown(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    dotenv = tmp_path / ".env"
    # No `=`: dotenv takes the whole line, token included, for a name; and warns once.
    dotenv.write_text(f"INVOISX_API_TOKEN:{TOKEN}\nINVOISX_API_TOKEN=x\n'bad line\n")
    environ = {f"INVOISX_{TOKEN}": "1", "INVOISX_RETRY_MAX2": "1"}
    found = find_unknown_variables(environ, str(dotenv))
    assert TOKEN not in repr(found)
    assert [(item.name, item.closest) for item in found] == [
        ("INVOISX_... (not shown: it may be a secret)", "INVOISX_RETRY_MAX"),
        ("INVOISX_... (not shown: it may be a secret)", None),
        ("INVOISX_... (not shown: it may be a secret)", None),
    ]
    assert capfd.readouterr().err == ""  # dotenv's own warning is pydantic-settings' to give
