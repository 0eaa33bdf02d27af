"""The audit log: one JSON line per request, to stdout and optionally a file.

Built as a structlog processor chain owned by the app (no global structlog configuration).
Callers pass only safe fields: never the token, a body, a query value or a client credential.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl

import orjson
import structlog
from starlette.types import Scope
from structlog.typing import FilteringBoundLogger

from proxy.config.settings import ConfigError
from proxy.exchange import Exchange
from proxy.stages.caller import peer_address

__all__ = ["AuditLog", "request_line", "uvicorn_log_config"]

# Paths are logged as sent, but an absurd one must not blow up every log line.
_MAX_LOGGED_PATH = 2048
# Query keys are logged by name; bound them so one odd request cannot bloat the log.
_MAX_LOGGED_KEYS = 32
_MAX_KEY_LENGTH = 64


def _query_keys(query_string: bytes) -> list[str]:
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    return sorted({key[:_MAX_KEY_LENGTH] for key, _ in pairs})[:_MAX_LOGGED_KEYS]


def request_line(
    exchange: Exchange, scope: Scope, token_fingerprint: str, seconds: float
) -> dict[str, Any]:
    """The fields of a call's `request` line: who, what, the outcome, never a value that
    could carry a secret (the query's values, a body, a credential)."""
    upstream_ms = exchange.upstream_ms
    return {
        "request_id": exchange.request_id,
        "client": exchange.client,
        "peer": peer_address(scope),
        "method": scope["method"][:16],
        "path": scope["raw_path"][:_MAX_LOGGED_PATH].decode("latin-1"),
        "route": exchange.route,
        "query_keys": _query_keys(scope["query_string"]),
        "status": exchange.status,
        "decision": exchange.decision,
        "required_permission": exchange.required,
        "error_code": exchange.error_code,
        "duration_ms": round(seconds * 1000, 3),
        "upstream_ms": None if upstream_ms is None else round(upstream_ms, 3),
        "waited_ms": round(exchange.waited_ms, 3),
        "retries": exchange.retries,
        "upstream_429s": exchange.throttled,
        "idempotency": exchange.idempotency,
        "bytes_in": exchange.bytes_in,
        "bytes_out": exchange.bytes_out,
        "token_fingerprint": token_fingerprint,
    }


class _LineWriter:
    """A structlog logger that writes the rendered lines to every stream, one event-loop turn
    at a time.

    Lines logged during one turn of the event loop go out together right after it, in one
    write per stream: under load, a write per line cost more than the rest of the audit
    stage. A line waits only for the other callbacks of its turn (microseconds; about a
    millisecond under full load). Without a running loop a line is written at once, and
    `AuditLog.close` writes what is pending.
    """

    def __init__(self, streams: list[IO[bytes]]) -> None:
        self._streams = streams
        self._pending: list[bytes] = []

    def msg(self, line: bytes) -> None:
        self._pending.append(line)
        if len(self._pending) > 1:
            return  # a flush is already scheduled for this turn
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:
            self.flush()

    debug = info = warning = error = critical = exception = msg

    def flush(self) -> None:
        """Write the pending lines now."""
        if not self._pending:
            return
        data = b"\n".join(self._pending) + b"\n"
        self._pending.clear()
        for stream in self._streams:
            # Each stream on its own: a closed stdout pipe must not cost the file its lines.
            try:
                stream.write(data)
                stream.flush()
            except (OSError, ValueError):
                continue


_LEAD_KEYS = ("timestamp", "level", "event")


def _lead_with_when_and_what(
    logger: Any, method_name: str, event_dict: dict[str, Any]
) -> dict[str, Any]:
    """Put timestamp, level and event first so a human scanning the lines reads them first."""
    lead = {key: event_dict.pop(key) for key in _LEAD_KEYS if key in event_dict}
    return lead | event_dict


def _processors() -> list[Any]:
    return [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.format_exc_info,
        _lead_with_when_and_what,
        # orjson: the audit line is written on every request, and it serialises several times
        # faster than the standard library.
        structlog.processors.JSONRenderer(serializer=orjson.dumps),
    ]


def _open(path: Path) -> IO[bytes]:
    try:
        return path.open("ab")
    except OSError as error:
        raise ConfigError(
            "INVOISX_PROXY_LOG_FILE", f"cannot open {path}: {error.strerror}"
        ) from None


class AuditLog:
    """Opens the log file and hands out the bound logger; `close()` at shutdown."""

    def __init__(self, log_file: Path | None, *, to_stdout: bool = True) -> None:
        self._file = _open(log_file) if log_file else None
        stdout: IO[bytes] = sys.stdout.buffer
        streams = [*([stdout] if to_stdout else []), *([self._file] if self._file else [])]
        self._writer = _LineWriter(streams)
        self.logger: FilteringBoundLogger = structlog.wrap_logger(
            self._writer,
            processors=_processors(),
            wrapper_class=structlog.make_filtering_bound_logger(0),
            cache_logger_on_first_use=True,
        )

    def close(self) -> None:
        """Write what is pending, then close the log file, if one was opened."""
        self._writer.flush()
        if self._file is not None:
            self._file.close()


def _orjson_text(value: Any, **options: Any) -> str:
    # logging's Formatter.format must return str; orjson gives bytes.
    return orjson.dumps(value, **options).decode()


def uvicorn_log_config() -> dict[str, Any]:
    """A logging dictConfig that renders uvicorn's own messages as JSON lines on stdout, in
    the audit lines' shape: the audit chain, with a renderer that returns str."""
    *audit_chain, _bytes_renderer = _processors()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": structlog.stdlib.ProcessorFormatter,
                # add_logger_name reads the LogRecord, which remove_processors_meta drops.
                "foreign_pre_chain": [structlog.stdlib.add_logger_name],
                "processors": [
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *audit_chain,
                    structlog.processors.JSONRenderer(serializer=_orjson_text),
                ],
            }
        },
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }
