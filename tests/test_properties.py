"""Property tests: random requests, sent raw, against the proxy and a recording stand-in.

Hypothesis draws the method, the request target (prefixes, percent-encodings, dot segments,
backslashes, control characters, raw UTF-8, overlong and empty segments, absolute form), the
query string, headers (duplicates, odd casing, credentials, routing and method-override
headers, `Connection` naming others, huge values, non-UTF-8 values), the body and its framing,
the token's permissions and the client key. The expected outcome is computed here from the
README and docs/security.md alone (`_expected`); for every case:

- the server token is in no response and no log line;
- the stand-in receives only what the policy allows, only below `/api/v1/`, exactly as sent,
  and never a client credential, `Forwarded`, `X-Forwarded-*` or `X-Real-IP`;
- every refusal is a documented InvoisX envelope with X-Request-ID and its audit line;
- the proxy keeps serving afterwards.

The servers start once per test; examples run inside it. `--hypothesis-profile=long` (or
INVOISX_HYPOTHESIS_EXAMPLES=N) runs more examples; profiles are in tests/conftest.py.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, unquote_to_bytes, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from proxy.config.keys import config_block, new_key
from tests.conftest import DOCUMENT_TYPES, TOKEN, Recorded, Recorder, RunningProxy
from tests.wire import PROXY_ERRORS, RawResponse, assert_proxy_error, exchange, parse_response

PERMISSIONS = ("create", "read", "update", "delete")
SUBSETS = [
    frozenset(chosen)
    for size in range(1, len(PERMISSIONS) + 1)
    for chosen in itertools.combinations(PERMISSIONS, size)
]
METHOD_PERMISSION = {
    "GET": "read",
    "HEAD": "read",
    "POST": "create",
    "PUT": "update",
    "PATCH": "update",
    "DELETE": "delete",
}
OTHER_METHODS = ["OPTIONS", "PROPFIND", "TRACE", "PURGE", "MKCOL", "LOCK", "SEARCH", "QUERY"]
# httptools refuses these before the proxy sees them; the proxy's listener answers 400.
UNPARSABLE_METHODS = ["get", "Post", "FOO", "DELETE2"]
DOCUMENT_ACTIONS = ("validate", "submit", "cancel")
# uvicorn's own plain-text refusal, which the listener replaces with the envelope.
UVICORN_REFUSAL = b"Invalid HTTP request received."
MAX_TARGET_BYTES = 8192  # README: a request target over 8 KiB gets 414

# Values that must never reach InvoisX; unique per run so a match cannot be a coincidence.
COOKIE_MARK = "ck" + secrets.token_hex(8)
PROXY_AUTH_MARK = "pa" + secrets.token_hex(8)
CLIENT_AUTH_MARK = "ca" + secrets.token_hex(8)
HOP_MARK = "hop" + secrets.token_hex(8)
MARKS = (COOKIE_MARK, PROXY_AUTH_MARK, CLIENT_AUTH_MARK, HOP_MARK)
NEVER_UPSTREAM = {
    "cookie",
    "proxy-authorization",
    "x-proxy-key",
    "forwarded",
    "x-real-ip",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "keep-alive",
    "te",
    "upgrade",
}
MAX_HEADER_BYTES = 32_768
T = TypeVar("T")


# --- what a case is ------------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """How the caller presents a client key: `client` is the index of the key that counts."""

    headers: tuple[tuple[str, bytes], ...] = ()
    client: int | None = None


@dataclass(frozen=True)
class Case:
    hostile: frozenset[str]
    method: str
    absolute: bool
    path: bytes
    query: bytes | None
    host: str
    origin: str | None
    fetch_site: str | None
    headers: tuple[tuple[str, bytes], ...]
    content_types: tuple[str, ...]
    body: bytes | None
    chunked: bool
    idempotent: bool  # send a fresh Idempotency-Key: the same outcome, through the store
    token: frozenset[str]
    credential: Credential

    def request(self, port: int, request_id: str) -> tuple[bytes, bytes]:
        """The request bytes and the Host value sent."""
        host = {
            "own": f"127.0.0.1:{port}",
            "localhost": f"localhost:{port}",
            "bare": "127.0.0.1",
            "ipv6": f"[::1]:{port}",
            "foreign": "invoisx.com",
            "foreign-port": f"evil.example:{port}",
            "none": "",
        }[self.host].encode()
        target = (b"http://evil.example" if self.absolute else b"") + self.path
        if self.query is not None:
            target += b"?" + self.query
        lines = [self.method.encode() + b" " + target + b" HTTP/1.1"]
        if self.host != "none":
            lines.append(b"Host: " + host)
        if self.origin is not None:
            origin = {"same": b"http://" + host, "null": b"null"}.get(self.origin)
            lines.append(b"Origin: " + (origin or self.origin.encode()))
        if self.fetch_site is not None:
            lines.append(b"Sec-Fetch-Site: " + self.fetch_site.encode())
        headers = [*self.headers, *self.credential.headers]
        headers += [("Content-Type", value.encode()) for value in self.content_types]
        headers.append(("X-Request-ID", request_id.encode()))
        if self.idempotent:
            headers.append(("Idempotency-Key", request_id.encode()))
        lines += [name.encode() + b": " + value for name, value in headers]
        lines.append(b"Connection: close")
        body = self.body or b""
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked")
            framed = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        elif self.body is not None:
            lines.append(b"Content-Length: " + str(len(body)).encode())
            framed = body
        else:
            framed = b""
        return b"\r\n".join(lines) + b"\r\n\r\n" + framed, host

    def header_bytes(self, port: int, request_id: str) -> int:
        """The headers' size as the proxy counts it: name + value + 4 per header."""
        request, _ = self.request(port, request_id)
        head = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
        return sum(len(line) - 2 + 4 for line in head)


# --- strategies ----------------------------------------------------------------------------
# Each case attacks a few dimensions (`Case.hostile`) and keeps the others benign: half the cases
# attack none, so a good share passes every check and is forwarded, where a leak would show.

DIMENSIONS = (
    "method", "target", "query", "host", "origin", "fetch_site", "headers", "content_type",
    "credential",
)  # fmt: skip

_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~"
_SAFE_ATOMS = [
    "%41", "%7E", "%7e", "%20", "%C3%A9", "%E2%82%AC", "%F0%9F%98%80", "%25", "%2525", "%zz",
    "%", "%4", "!", "$", "&", "'", "(", ")", "*", "+", ",", ";", "=", ":", "@", ".", "a.b",
    '"', "<", ">", "{", "}", "|", "^", "`", "[", "]", "%76alidate", "%73ubmit", "%2520",
]  # fmt: skip
_UNSAFE_ATOMS = [
    ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2E.", "%2f", "%2F", "%5c", "%5C", "\\",
    "%252e", "%252E%252e", "%252f", "%255c", "%00", "%0a", "%0d%0aX-Injected:1", "%1f", "%7f",
    "%7F", "%2500", "%257f", "%09",
]  # fmt: skip
# Raw UTF-8 and DEL in a request target: httptools refuses them before the proxy sees them.
_RAW_BYTES = ["é", "€", "\u202e", "\x7f"]
_NAMES = ["buyers", "invoices", "validate", "submit", "cancel", "credit-notes", "status", "me"]
_OTHER_PREFIXES = [
    "/api/v2/", "/API/v1/", "/api/v1", "/api/v1%2f", "/api%2fv1/", "//api/v1/", "/x/api/v1/",
    "/api/./v1/", "/api/v1/../v1/", "/%61pi/v1/", "/api/v1/%2e%2e/", "/", "/api/v1/./",
]  # fmt: skip

_plain = st.text(_TOKEN_CHARS, min_size=1, max_size=16)
_safe_segment = st.one_of(
    st.sampled_from(_NAMES),
    _plain,
    st.lists(st.one_of(_plain, st.sampled_from(_SAFE_ATOMS)), min_size=1, max_size=4).map("".join),
)
_any_segment = st.one_of(
    _safe_segment,
    st.lists(
        st.one_of(
            _plain,
            st.sampled_from(_SAFE_ATOMS),
            st.sampled_from(_UNSAFE_ATOMS),
            st.sampled_from(_RAW_BYTES),
        ),
        min_size=1,
        max_size=4,
    ).map("".join),
    st.integers(200, 6000).map(lambda n: "a" * n),
    st.just(""),
)
_document_action = st.tuples(
    _plain,
    st.sampled_from([*DOCUMENT_ACTIONS, *DOCUMENT_ACTIONS, "%76alidate", "Submit", "cancel%2f"]),
).map(lambda drawn: ["invoices", *drawn])


@st.composite
def _targets(draw: st.DrawFn, hostile: bool) -> tuple[bool, bytes]:
    """Absolute form or not, and the path."""
    if not hostile:
        segments = draw(st.one_of(st.lists(_safe_segment, max_size=5), _document_action))
        prefix, absolute = "/api/v1/", False
    else:
        segments = draw(st.lists(_any_segment, max_size=5))
        prefix = draw(st.one_of(st.just("/api/v1/"), st.sampled_from(_OTHER_PREFIXES)))
        absolute = draw(st.booleans())
    trailing = "/" if draw(st.booleans()) and segments else ""
    return absolute, (prefix + "/".join(segments) + trailing).encode()


_QUERY_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "#")
_QUERY_KEYS = [
    "page", "per_page", "search", "_method", "%5Fmethod", "%5fmethod", ".method", " method",
    "+method", "_method[]", "_method[x]", "_methodx", "_METHOD", "method", "x_method",
    "access_token", "token", "_meth%6Fd", "+_method", "%20_method", "_method%00x", "_method[",
]  # fmt: skip
_query_pairs = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(_QUERY_KEYS), st.text(_TOKEN_CHARS, max_size=8)),
        st.sampled_from(["", "DELETE", "1", "a%20b", "%00", "=", "x=y"]),
    ),
    max_size=5,
).map(lambda pairs: "&".join(f"{key}={value}" for key, value in pairs))
_benign_query = st.sampled_from([None, "", "page=2", "per_page=15&search=acme", "method=x"])
_hostile_query = st.one_of(st.text(_QUERY_CHARS, max_size=120), _query_pairs)

_CASE_CHANGES: list[Callable[[str], str]] = [str, str.lower, str.upper, str.swapcase, str.title]
_case_change = st.sampled_from(_CASE_CHANGES)
# Headers the proxy must drop or replace, and others it should pass; none of them refuses.
_PASSING_HEADERS: list[tuple[tuple[str, bytes], ...]] = [
    (("Cookie", f"session={COOKIE_MARK}".encode()),),
    (("Cookie", f"a=1; b={COOKIE_MARK}".encode()), ("Cookie", b"c=3")),
    (("Proxy-Authorization", f"Basic {PROXY_AUTH_MARK}".encode()),),
    (("X-Forwarded-For", b"203.0.113.9"),),
    (("X-Forwarded-Host", b"evil.example"),),
    (("X-Forwarded-Proto", b"https"),),
    (("X-Forwarded-Prefix", b"/admin"),),
    (("Forwarded", b"for=203.0.113.9;host=evil.example;proto=https"),),
    (("X-Real-IP", b"203.0.113.9"),),
    (("X-HTTP-Method-Override", b"DELETE"),),
    (("X-HTTP-Method", b"DELETE"),),
    (("X-Method-Override", b"PUT"),),
    (("Connection", b"X-Hop-A"), ("X-Hop-A", HOP_MARK.encode())),
    (("Connection", b"keep-alive, X-Hop-B"), ("X-Hop-B", HOP_MARK.encode())),
    (("Keep-Alive", b"timeout=5"),),
    (("TE", b"trailers"),),
    (("Upgrade", b"h2c"),),
    (("Accept", b"*/*"),),
    (("Accept", b"text/csv"),),
    (("Accept-Encoding", b"gzip, br"),),
    (("User-Agent", b"curl/8.0"),),
    (("X-Note", "café".encode()),),
    (("Expect", b"100-continue"),),
    (("Authorization", f"Basic {CLIENT_AUTH_MARK}".encode()),),
    (("Authorization", f"Token {CLIENT_AUTH_MARK}".encode()),),
]
# With client keys configured, a Bearer value among them would pick the client.
_ANONYMOUS_ONLY = [(("Authorization", f"Bearer {CLIENT_AUTH_MARK}".encode()),)]
_VALUE_CHARS = "".join(chr(c) for c in range(0x21, 0x7F))
_random_header = st.tuples(
    st.text(_TOKEN_CHARS, min_size=1, max_size=20).map(lambda name: "X-R-" + name),
    st.text(_VALUE_CHARS, max_size=64).map(str.encode),
).map(lambda header: (header,))
_refused_header = st.one_of(
    # 431 above 32 KiB of headers in all
    st.one_of(st.integers(1_000, 30_000), st.integers(33_000, 40_000)).map(
        lambda n: (("X-Big", b"b" * n),)
    ),
    st.just((("X-Note", b"caf\xe9"),)),  # not UTF-8: 400
)


def _headers(*, anonymous: bool, hostile: bool) -> st.SearchStrategy[tuple[tuple[str, bytes], ...]]:
    passing = _PASSING_HEADERS + (_ANONYMOUS_ONLY if anonymous else [])
    group = st.one_of(st.sampled_from(passing), _random_header)
    groups = st.lists(group, max_size=10)
    if hostile:
        groups = st.tuples(groups, _refused_header, st.integers(0, 10)).map(
            lambda drawn: [*drawn[0][: drawn[2]], drawn[1], *drawn[0][drawn[2] :]]
        )
    return st.tuples(groups, st.lists(_case_change, min_size=11, max_size=11)).map(
        lambda drawn: tuple(
            (change(name), value)
            for group, change in zip(drawn[0], drawn[1], strict=False)
            for name, value in group
        )
    )


_benign_content_types = st.lists(
    st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"]),
    max_size=1,
)
_hostile_content_types = st.lists(
    st.sampled_from(
        [
            "application/x-www-form-urlencoded",
            "application/x-www-form-urlencoded;charset=UTF-8",
            "Multipart/Form-Data; boundary=x",
            "multipart/mixed; boundary=x",
            "application/x-www-form-urlencoded,x",
            "multipart/form-data boundary=x",
            "application/json",
        ]
    ),
    min_size=1,
    max_size=2,
)
FULL = SUBSETS[-1]
# Often every permission, so the other dimensions get their turn; else any non-empty set.
_permissions = st.one_of(st.just(FULL), st.sampled_from(SUBSETS))


@st.composite
def _credentials(draw: st.DrawFn, keys: list[str] | None, hostile: bool) -> Credential:
    if keys is None:
        return Credential()
    kind = draw(st.sampled_from(["none", "unknown"] if hostile else ["bearer", "header", "both"]))
    index = SUBSETS.index(draw(_permissions))
    key = keys[index]
    scheme = draw(st.sampled_from(["Bearer", "bearer", "BEARER", "BeArEr"]))
    proxy_key = draw(st.sampled_from(["X-Proxy-Key", "x-proxy-key", "X-PROXY-KEY"]))
    if kind == "none":
        return Credential()
    if kind == "unknown":
        wrong = draw(st.sampled_from([key[:-1], key + "x", key.upper(), new_key(), "ipk_"]))
        where = draw(st.sampled_from([("Authorization", f"{scheme} {wrong}"), (proxy_key, wrong)]))
        return Credential(((where[0], where[1].encode()),), None)
    if kind == "bearer":
        return Credential((("Authorization", f"{scheme} {key}".encode()),), index)
    if kind == "header":
        return Credential(((proxy_key, key.encode()),), index)
    other = draw(st.sampled_from([*keys, new_key()]))
    headers = [("Authorization", f"{scheme} {other}".encode()), (proxy_key, key.encode())]
    return Credential(tuple(draw(st.permutations(headers))), index)


@st.composite
def cases(draw: st.DrawFn, keys: list[str] | None) -> Case:
    hostile = draw(
        st.one_of(
            st.just(frozenset[str]()),
            st.frozensets(st.sampled_from(DIMENSIONS), min_size=1, max_size=3),
        )
    )

    def pick(dimension: str, benign: st.SearchStrategy[T], attack: st.SearchStrategy[T]) -> T:
        return draw(attack if dimension in hostile else benign)

    absolute, path = draw(_targets("target" in hostile))
    return Case(
        hostile=hostile,
        method=pick(
            "method",
            # POST is what the document actions are about.
            st.sampled_from(list(METHOD_PERMISSION))
            | (st.just("POST") if path.startswith(b"/api/v1/invoices/") else st.nothing()),
            st.sampled_from(OTHER_METHODS + UNPARSABLE_METHODS),
        ),
        absolute=absolute,
        path=path,
        query=_query_bytes(pick("query", _benign_query, _hostile_query)),
        host=pick(
            "host",
            st.sampled_from(["own", "localhost", "bare", "ipv6", "none"]),
            st.sampled_from(["foreign", "foreign-port"]),
        ),
        origin=pick(
            "origin", st.sampled_from([None, "same"]), st.sampled_from(["null", "https://e.x"])
        ),
        fetch_site=pick(
            "fetch_site",
            st.sampled_from([None, "same-origin", "none"]),
            st.sampled_from(["cross-site", "Same-Site"]),
        ),
        headers=draw(_headers(anonymous=keys is None, hostile="headers" in hostile)),
        content_types=tuple(pick("content_type", _benign_content_types, _hostile_content_types)),
        body=draw(st.one_of(st.none(), st.binary(max_size=2048))),
        chunked=draw(st.integers(0, 4)) == 0,
        idempotent=draw(st.booleans()),
        token=draw(_permissions),
        credential=draw(_credentials(keys, "credential" in hostile)),
    )


def _query_bytes(query: str | None) -> bytes | None:
    return None if query is None else query.replace(" ", "%20").encode()


# --- what the docs say must happen ---------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    status: int
    error_code: str
    extra: tuple[tuple[str, object], ...] = ()


FORWARD = "forward"
Outcome = Refusal | str


def _segment_verdict(raw: bytes) -> bool | None:
    """True: README says refuse; False: must pass; None: the README leaves it open."""
    if any(byte <= 0x20 or byte >= 0x7F for byte in raw):
        return True
    open_question = False
    decoded = raw
    for _ in range(2):  # README: `%2e` and `%252e` alike
        decoded = unquote_to_bytes(decoded)
        if b"/" in decoded or b"\\" in decoded or decoded in (b".", b".."):
            return True
        if any(byte < 0x20 or byte == 0x7F for byte in decoded):
            return True
        open_question |= b".." in decoded  # `a..b` is no dot segment, but refusing is fine
    return None if open_question else False


def _decoded_segments(rest: bytes) -> tuple[str, ...]:
    parts = rest.split(b"/")
    if parts[-1] == b"":
        parts.pop()
    return tuple(unquote_to_bytes(part).decode("utf-8", "replace") for part in parts)


def _required(method: str, segments: tuple[str, ...]) -> str:
    if (
        method == "POST"
        and len(segments) == 3
        and segments[0] in DOCUMENT_TYPES
        and segments[2] in DOCUMENT_ACTIONS
    ):
        return "update"
    return METHOD_PERMISSION[method]


def _method_override(query: bytes) -> bool | None:
    """Whether PHP would set `$_GET['_method']` (None: the model cannot tell; `[` is subtle)."""
    verdict: bool | None = False
    for key, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        # PHP cuts a name at NUL, strips leading spaces, and reads ' ' and '.' as '_'.
        php_name = re.sub(r"[ .]", "_", key.split("\0")[0].lstrip(" "))
        if php_name == "_method" or (php_name.startswith("_method[") and "]" in php_name):
            return True
        if "[" in php_name and php_name.startswith("_method"):
            verdict = None
    return verdict


def _expected(
    case: Case, port: int, request_id: str, clients: list[frozenset[str]] | None
) -> set[Outcome]:
    """Every outcome the docs allow for `case`.

    Stages in the pipeline's order: target, caller, client key, method, method override,
    policy, request size, header encoding. A stage that must refuse ends the list; one that
    may refuse adds its refusal and goes on.
    """
    allowed: set[Outcome] = set()
    if case.method in UNPARSABLE_METHODS:
        return {Refusal(400, "BAD_REQUEST")}
    # The listener refuses a target over 8 KiB as it reads it (give or take an absolute
    # form's scheme and host); llhttp refuses a raw non-ASCII byte where it finds it.
    target = len(case.path) + (len(case.query) + 1 if case.query is not None else 0)
    too_long: set[Outcome] = (
        {Refusal(414, "URI_TOO_LONG")} if target > MAX_TARGET_BYTES - 64 else set()
    )
    if any(byte >= 0x7F for byte in case.path):
        return {Refusal(400, "BAD_REQUEST")} | too_long
    if target > MAX_TARGET_BYTES + 64:
        return too_long
    allowed |= too_long
    path = case.path
    if not path.startswith(b"/api/v1/") or path == b"/api/v1/":
        return allowed | {Refusal(404, "NOT_FOUND")}
    rest = path[len(b"/api/v1/") :]
    parts = rest.split(b"/")
    if parts[-1] == b"":
        parts.pop()
    verdicts = [True if not part else _segment_verdict(part) for part in parts]
    if True in verdicts:
        return allowed | {Refusal(400, "BAD_REQUEST")}
    if None in verdicts:
        allowed.add(Refusal(400, "BAD_REQUEST"))

    _, host = case.request(port, request_id)
    if host and urlsplit("//" + host.decode()).hostname not in ("127.0.0.1", "localhost", "::1"):
        return allowed | {Refusal(400, "BAD_REQUEST")}
    if case.origin is not None:
        origin = {"same": "http://" + host.decode(), "null": "null"}.get(case.origin, case.origin)
        if not host or urlsplit(origin).netloc != host.decode():
            return allowed | {Refusal(403, "FORBIDDEN")}
    if case.fetch_site is not None and case.fetch_site.lower() in ("cross-site", "same-site"):
        return allowed | {Refusal(403, "FORBIDDEN")}

    client_permissions = None
    if clients is not None:
        if case.credential.client is None:
            return allowed | {Refusal(401, "UNAUTHORIZED")}
        client_permissions = clients[case.credential.client]

    if case.method not in METHOD_PERMISSION:
        return allowed | {Refusal(405, "METHOD_NOT_ALLOWED")}
    override = _method_override(case.query or b"")
    if override:
        return allowed | {Refusal(400, "BAD_REQUEST")}
    if override is None:
        allowed.add(Refusal(400, "BAD_REQUEST"))
    if len(case.content_types) > 1:
        return allowed | {Refusal(400, "BAD_REQUEST")}
    forms = ("application/x-www-form-urlencoded", "multipart/form-data")
    # PHP cuts the type at ';', ',' or a space.
    if any(re.split(r"[;, ]", value.lower())[0] in forms for value in case.content_types):
        return allowed | {Refusal(415, "UNSUPPORTED_MEDIA_TYPE")}

    required = _required(case.method, _decoded_segments(rest))
    missing = [
        side
        for side, granted in (("token", case.token), ("client", client_permissions))
        if granted is not None and required not in granted
    ]
    if missing:
        extra = (("required_permission", required), ("missing_from", tuple(missing)))
        return allowed | {Refusal(403, "FORBIDDEN", extra)}

    size = case.header_bytes(port, request_id)
    if abs(size - MAX_HEADER_BYTES) < 64:
        allowed.add(Refusal(431, "HEADERS_TOO_LARGE"))
    elif size > MAX_HEADER_BYTES:
        return allowed | {Refusal(431, "HEADERS_TOO_LARGE")}
    if any(name.lower() == "x-note" and value == b"caf\xe9" for name, value in case.headers):
        return allowed | {Refusal(400, "BAD_REQUEST")}
    return allowed | {FORWARD}


# --- running cases -------------------------------------------------------------------------


@dataclass
class Sent:
    """A case that got an answer with a request id: what its audit line must say."""

    request_id: str
    status: int
    decision: str


@dataclass
class Fleet:
    """One proxy per token permission set, started on first use, all before one stand-in."""

    recorder: tuple[Recorder, str]
    start_proxy: Callable[..., RunningProxy]
    config: Path | None = None
    keys: list[str] | None = None
    clients: list[frozenset[str]] | None = None
    proxies: dict[frozenset[str], RunningProxy] = field(default_factory=dict)
    sent: dict[frozenset[str], list[Sent]] = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=itertools.count)
    examples: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    def proxy(self, token: frozenset[str]) -> RunningProxy:
        if token not in self.proxies:
            overrides = {"token_permissions": ",".join(sorted(token))}
            if self.config is not None:
                overrides["config"] = str(self.config)
            self.proxies[token] = self.start_proxy(self.recorder[1], **overrides)
            self.sent[token] = []
        return self.proxies[token]

    def run(self, case: Case) -> None:
        self.examples += 1
        stand_in = self.recorder[0]
        stand_in.requests.clear()
        running = self.proxy(case.token)
        port = int(running.url.rsplit(":", 1)[1])
        request_id = f"prop-{next(self.ids)}-{secrets.token_hex(4)}"
        request, _ = case.request(port, request_id)
        allowed = _expected(case, port, request_id, self.clients)
        raw = exchange(port, request)

        assert TOKEN.encode() not in raw
        for key in self.keys or ():
            assert key.encode() not in raw
        head = case.method == "HEAD"
        assert not raw.endswith(UVICORN_REFUSAL), raw[:300]
        response = parse_response(raw, head=head)
        seen = list(stand_in.requests)
        if seen:
            assert FORWARD in allowed, (allowed, response.status, response.body[:300])
            assert len(seen) == 1
            self._check_forwarded(case, seen[0], response, request_id)
            outcome: Outcome = FORWARD
        else:
            outcome = self._check_refused(case, response, allowed, head)
        event(f"{response.status} {outcome}")
        self.outcomes[str(response.status)] += 1
        # A request the parser refused has a request id of the proxy's making.
        answered_id = response.header("x-request-id")[0]
        self.sent[case.token].append(Sent(answered_id, response.status, _decision(outcome)))

    def _check_forwarded(
        self, case: Case, seen: Recorded, response: RawResponse, request_id: str
    ) -> None:
        assert seen.method == case.method
        assert seen.raw_path == case.path
        assert seen.raw_path.startswith(b"/api/v1/")
        assert seen.query_string == (case.query or b"")
        assert seen.body == (case.body or b"")
        assert seen.header("authorization") == [f"Bearer {TOKEN}"]
        assert seen.header("x-request-id") == [request_id]
        names = {name.decode("latin-1") for name, _ in seen.headers}
        assert not names & NEVER_UPSTREAM, names
        assert not {name for name in names if name.startswith(("x-forwarded-", "x-hop-"))}
        assert seen.header("host") == [self.recorder[1].split("/")[2]]
        upstream = b"\n".join(name + b": " + value for name, value in seen.headers)
        for secret in (*MARKS, *(self.keys or ())):
            assert secret.encode() not in upstream, secret
        assert response.status == 200
        assert response.header("x-request-id") == [request_id]
        if case.method != "HEAD":
            assert response.body == b'{"success":true,"data":[]}'

    def _check_refused(
        self, case: Case, response: RawResponse, allowed: set[Outcome], head: bool
    ) -> Refusal:
        assert response.header("x-request-id"), response
        if head:
            matching = [
                outcome
                for outcome in allowed
                if isinstance(outcome, Refusal) and outcome.status == response.status
            ]
            assert matching, (allowed, response.status)
            assert response.header("content-type") == ["application/json"]
            return matching[0]
        body = assert_proxy_error(response)
        assert body is not None, (allowed, response.status, response.body[:300])
        refusal = next(
            (
                outcome
                for outcome in allowed
                if isinstance(outcome, Refusal) and outcome.error_code == body["error_code"]
            ),
            None,
        )
        assert refusal is not None, (allowed, body)
        for key, value in refusal.extra:
            assert body[key] == (list(value) if isinstance(value, tuple) else value), body
        if refusal.status == 405:
            assert response.header("allow")
        return refusal

    def check_coverage(self) -> None:
        """The run sent enough cases, some forwarded and some refused (else it proved little)."""
        logging.getLogger(__name__).info("%d cases: %s", self.examples, dict(self.outcomes))
        assert self.examples >= settings().max_examples
        assert self.outcomes["200"] > 0, self.outcomes
        assert self.outcomes.total() > self.outcomes["200"], self.outcomes

    def check_afterwards(self, caplog: pytest.LogCaptureFixture) -> None:
        """Audit lines for every answer, no secret in any log, and every proxy still serving."""
        for token, running in self.proxies.items():
            self._check_audit(running, self.sent[token])
            assert httpx.get(f"{running.url}/healthz").status_code == 200
            assert TOKEN not in httpx.get(f"{running.url}/metrics").text
            permission = sorted(token)[0]
            method, path = {
                "read": ("GET", "/buyers"),
                "create": ("POST", "/buyers"),
                "update": ("PUT", "/buyers/b1"),
                "delete": ("DELETE", "/buyers/b1"),
            }[permission]
            headers = {"authorization": f"Bearer {self.keys[-1]}"} if self.keys else {}
            response = httpx.request(
                method, f"{running.url}/api/v1{path}", headers=headers, json={"a": 1}
            )
            assert response.status_code == 200, response.text
        for record in caplog.records:
            assert record.levelno < logging.ERROR, record.getMessage()
            assert TOKEN not in record.getMessage()
            assert TOKEN not in (record.exc_text or "")

    def _check_audit(self, running: RunningProxy, sent: list[Sent]) -> None:
        deadline = time.monotonic() + 10
        while True:
            text = running.log_path.read_text()
            lines = {
                line["request_id"]: line for line in running.log_lines() if "request_id" in line
            }
            missing = [one for one in sent if one.request_id not in lines]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not missing, f"{len(missing)} answers without an audit line: {missing[:3]}"
        assert TOKEN not in text
        for key in self.keys or ():
            assert key not in text
        for one in sent:
            line = lines[one.request_id]
            assert (line["status"], line["decision"]) == (one.status, one.decision), line


def _decision(outcome: Outcome) -> str:
    if outcome == FORWARD:
        return "forwarded"
    assert isinstance(outcome, Refusal)
    return "denied" if outcome.status in (401, 403) else "invalid"


def _plain_case(method: str, path: bytes, token: set[str]) -> Case:
    return Case(
        hostile=frozenset(),
        method=method,
        absolute=False,
        path=path,
        query=None,
        host="own",
        origin=None,
        fetch_site=None,
        headers=(),
        content_types=(),
        body=b"{}",
        chunked=False,
        idempotent=False,
        token=frozenset(token),
        credential=Credential(),
    )


def _examples() -> settings:
    return settings(
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- the tests -----------------------------------------------------------------------------


def test_random_requests_to_an_open_proxy(
    recorder: tuple[Recorder, str],
    start_proxy: Callable[..., RunningProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = Fleet(recorder, start_proxy)

    @_examples()
    @given(case=cases(keys=None))
    # The built-in rules, every run: document actions need `update`, not `create`.
    @example(case=_plain_case("POST", b"/api/v1/invoices/i1/submit", {"create", "read"}))
    @example(case=_plain_case("POST", b"/api/v1/invoices/i1/%76alidate", {"create"}))
    @example(case=_plain_case("POST", b"/api/v1/invoices/i1/cancel/", {"update"}))
    @example(case=_plain_case("DELETE", b"/api/v1/buyers/b1", {"create", "read", "update"}))
    def run(case: Case) -> None:
        fleet.run(case)

    run()
    fleet.check_afterwards(caplog)
    fleet.check_coverage()


def test_random_requests_with_client_keys(
    recorder: tuple[Recorder, str],
    start_proxy: Callable[..., RunningProxy],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One client per permission set, so every intersection with the token occurs.
    keys = [new_key() for _ in SUBSETS]
    config = tmp_path / "proxy.toml"
    config.write_text(
        "\n".join(
            config_block(f"app-{'-'.join(sorted(subset))}", key, subset)
            for subset, key in zip(SUBSETS, keys, strict=True)
        )
    )
    fleet = Fleet(recorder, start_proxy, config=config, keys=keys, clients=list(SUBSETS))

    @_examples()
    @given(case=cases(keys=keys))
    def run(case: Case) -> None:
        fleet.run(case)

    run()
    fleet.check_afterwards(caplog)
    fleet.check_coverage()


def test_the_oracle_itself() -> None:
    """The expectations above are computed from the README; pin a few by hand."""
    assert _segment_verdict(b"%2e") is True
    assert _segment_verdict(b"%252e%252e") is True
    assert _segment_verdict(b"a..b") is None
    assert _segment_verdict(b"%2525252e") is False
    assert _segment_verdict(b"buyers") is False
    assert _method_override(b"_method=DELETE") is True
    assert _method_override(b"%5Fmethod=DELETE") is True
    assert _method_override(b"page=2") is False
    assert _required("POST", ("invoices", "i1", "submit")) == "update"
    assert _required("POST", ("invoices", "i1", "pdf")) == "create"
    assert set(PROXY_ERRORS) >= {"NOT_FOUND", "METHOD_NOT_ALLOWED", "HEADERS_TOO_LARGE"}


def test_newline_outside_the_api_gets_the_envelope(proxy: RunningProxy) -> None:
    port = int(proxy.url.rsplit(":", 1)[1])
    request = b"GET /api/v2/a%0ab HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    response = parse_response(exchange(port, request))
    assert response.status == 404
    assert assert_proxy_error(response) is not None
    assert proxy.last_audit()["request_id"] == response.header("x-request-id")[0]
