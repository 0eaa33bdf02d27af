"""How an exchange with InvoisX can fail, and the one mapping of those failures to the
answers the client gets (502 or 504), as httpx maps httpcore's exceptions in one place.

Each failure's text is one sentence for the client saying what went wrong. It names neither
InvoisX's address nor anything InvoisX sent, which could carry the token.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl

import httptools

from proxy import errors
from proxy.errors import ProxyError

__all__ = [
    "Broken",
    "Dropped",
    "Stalled",
    "Unreachable",
    "UpstreamError",
    "answer_failure",
    "connect_failure",
    "ended",
    "failure",
]


class UpstreamError(Exception):
    """The exchange with InvoisX failed; the forward stage turns this into 502 or 504.

    Its text is one sentence for the client saying what went wrong. It names neither
    InvoisX's address nor anything InvoisX sent, which could carry the token.
    """


class Unreachable(UpstreamError):
    """No connection (refused, unresolvable, TLS refused, too slow): nothing was sent."""


class Broken(UpstreamError):
    """The connection failed after the request went out: closed, reset, or not HTTP."""


class Dropped(Broken):
    """A reused connection closed before any byte of the answer: InvoisX may have closed it
    while idle, before or after reading the request (a keep-alive race)."""


class Stalled(UpstreamError):
    """InvoisX stopped answering or stopped taking the upload (see `Connection.time_out`)."""


def connect_failure(error: OSError) -> str:
    """What the client is told when no connection to InvoisX could be opened."""
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = "its TLS certificate could not be verified"
    elif isinstance(error, ssl.SSLError):
        reason = "the TLS handshake failed"
    elif isinstance(error, socket.gaierror):
        reason = "its host name could not be resolved"
    elif isinstance(error, ConnectionRefusedError) or _refused_everywhere(str(error)):
        reason = "the connection was refused"
    elif error.errno:
        # From errno alone: asyncio's own text names InvoisX's address ("Connect call failed
        # ('203.0.113.9', 443)"), which is no business of the client's.
        reason = f"the connection failed ({os.strerror(error.errno)})"
    else:
        reason = "the connection failed"
    return f"InvoisX could not be reached: {reason}."


def _refused_everywhere(text: str) -> bool:
    # With several addresses (localhost: ::1 and 127.0.0.1), asyncio raises a plain OSError
    # whose text lists each address's failure.
    errnos = set(re.findall(r"\[Errno (\d+)\]", text))
    return errnos == {str(errno.ECONNREFUSED)}


def ended(exc: Exception | None) -> str:
    """How a connection to InvoisX ended, as the start of a sentence: a clean close is
    InvoisX's doing; a reset may be InvoisX's or the network's."""
    return "InvoisX closed the connection" if exc is None else "The connection to InvoisX was reset"


def answer_failure(error: httptools.HttpParserError, *, head_in: bool) -> str:
    """What was wrong with an answer the parser refused; llhttp's reasons are fixed texts,
    never InvoisX's bytes."""
    text = str(error)[:80]
    reason = text[:1].lower() + text[1:]
    if head_in:
        return f"InvoisX's answer broke its chunked framing ({reason})."
    if reason.startswith("expected HTTP/"):
        return "InvoisX answered with something that is not HTTP."
    if isinstance(error, httptools.HttpParserInvalidStatusError) or any(
        word in reason for word in ("status", "version", "response line")
    ):
        return f"InvoisX's answer has an invalid status line ({reason})."
    return f"InvoisX's answer has invalid headers ({reason})."


def failure(error: UpstreamError, *, note: str = "") -> ProxyError:
    """The answer for a failed exchange: 504 when InvoisX was too slow, else 502; `note` is
    added to the message."""
    if isinstance(error, Stalled):
        return errors.upstream_timeout(f"{error}{note}")
    return errors.upstream_unavailable(f"{error}{note}")
