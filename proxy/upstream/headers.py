"""Header policy: which headers cross the proxy, each way, and what the proxy adds.

Only end-to-end headers cross. The client's credentials, cookies and routing headers never
reach InvoisX, nor do headers a PHP backend would read as others; cookies and hop-by-hop
headers never come back. Header values go up only as valid UTF-8.
"""

from __future__ import annotations

from proxy import __version__, errors

__all__ = ["JSON", "USER_AGENT", "request_headers", "response_headers"]

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Credentials and routing information belong to the client's hop, never to InvoisX.
_NEVER_UPSTREAM = _HOP_BY_HOP | {
    b"authorization",
    b"cookie",
    b"forwarded",
    b"host",
    b"x-real-ip",
    b"x-proxy-key",
    b"x-request-id",
    b"expect",
    b"accept-encoding",
    # The forwarder frames the body itself.
    b"content-length",
    # A Laravel backend would run the named method instead of the one the policy checked.
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
    # httpoxy: a CGI-style backend reads this as its own outgoing proxy (HTTP_PROXY).
    b"proxy",
}
_NEVER_DOWNSTREAM = _HOP_BY_HOP | {b"set-cookie", b"x-request-id"}
JSON = b"application/json"
USER_AGENT = f"invoisx-proxy/{__version__}".encode()
# The characters of a header name that may go upstream (names arrive lowercased).
_PLAIN = b"abcdefghijklmnopqrstuvwxyz0123456789-"


def _named_in_connection(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(token.strip().lower() for token in value.split(b","))
    return names


def _check_utf8(value: bytes) -> bytes:
    # InvoisX's stack reads header values as UTF-8; anything else could be read as another
    # value than the one the proxy checked, so it does not pass.
    if not value.isascii():
        try:
            value.decode()
        except UnicodeDecodeError:
            raise errors.header_not_utf8() from None
    return value


def request_headers(
    headers: list[tuple[bytes, bytes]], authorization: bytes, has_body: bool, request_id: str
) -> list[tuple[bytes, bytes]]:
    """The headers to send upstream: the client's end-to-end ones plus the injected ones."""
    dropped = _NEVER_UPSTREAM | _named_in_connection(headers)
    kept: list[tuple[bytes, bytes]] = []
    present: set[bytes] = set()
    accept: bytes | None = None
    for raw_name, value in headers:
        name = raw_name.lower()
        # PHP reads '_' and '.' in a header name as it reads '-' (all become HTTP_X_...), so
        # X_Proxy_Key or X.HTTP.Method.Override would arrive as a header the rules drop; like
        # nginx by default, only letters, digits and '-' go upstream.
        if name in dropped or name.startswith(b"x-forwarded-") or name.translate(None, _PLAIN):
            continue
        if name == b"accept":
            accept = value
            continue
        present.add(name)
        kept.append((name, _check_utf8(value)))
    # InvoisX (Laravel) answers auth errors with redirects unless JSON is asked for.
    if accept is None or accept.strip() in (b"", b"*/*"):
        accept = JSON
    kept.append((b"accept", _check_utf8(accept)))
    if has_body and b"content-type" not in present:
        kept.append((b"content-type", JSON))
    # Never compressed: the token scrub (`proxy.upstream.scrub`) must read every answer.
    kept.append((b"accept-encoding", b"identity"))
    if b"user-agent" not in present:
        kept.append((b"user-agent", USER_AGENT))
    kept.append((b"x-request-id", request_id.encode()))
    kept.append((b"authorization", authorization))
    return kept


def response_headers(
    headers: list[tuple[bytes, bytes]], request_id: str
) -> list[tuple[bytes, bytes]]:
    """The upstream response headers that may be passed back, plus the proxy's request id."""
    dropped = _NEVER_DOWNSTREAM | _named_in_connection(headers)
    kept = [(name.lower(), value) for name, value in headers if name.lower() not in dropped]
    kept.append((b"x-request-id", request_id.encode()))
    return kept
