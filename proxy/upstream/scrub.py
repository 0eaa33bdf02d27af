"""The server-held token never goes back to a client, even when an answer echoes it.

An upstream debug page (Laravel's, which a client can ask for with `Accept: text/html`) or a
WAF's or load balancer's error page may show the Authorization header it was sent. Headers
holding the token's secret are dropped; in bodies the secret's bytes are masked with as many
bytes, so a `Content-Length` stays true, also when the secret is split across chunks. The
secret is looked for as sent and as PHP would escape it in JSON (`json_encode` writes `/` as
`\\/`) and in HTML (`htmlspecialchars`), where those differ.
"""

from __future__ import annotations

import functools
from itertools import chain

__all__ = ["Scrub", "secret_forms"]

_JSON_ESCAPES = ((b"\\", b"\\\\"), (b'"', b'\\"'), (b"/", b"\\/"))
_HTML_ESCAPES = (
    (b"&", b"&amp;"),
    (b'"', b"&quot;"),
    (b"'", b"&#039;"),
    (b"<", b"&lt;"),
    (b">", b"&gt;"),
)


def _escaped(secret: bytes, escapes: tuple[tuple[bytes, bytes], ...]) -> bytes:
    for raw, escape in escapes:
        secret = secret.replace(raw, escape)
    return secret


@functools.lru_cache(maxsize=16)
def secret_forms(authorization: bytes) -> tuple[bytes, ...]:
    """The secret of `Bearer <secret>` as sent and as escaped, each once, longest first."""
    secret = authorization.removeprefix(b"Bearer ")
    forms = {secret, _escaped(secret, _JSON_ESCAPES), _escaped(secret, _HTML_ESCAPES)}
    return tuple(sorted(forms, key=len, reverse=True))


def _mask(secret: bytes) -> bytes:
    # A byte the secret lacks, so masked bytes never make up a secret with the next ones;
    # a secret (a header value) holds no space.
    return (b" " if b"*" in secret else b"*") * len(secret)


class Scrub:
    """The masking of one answer, for the secret in `authorization` (`Bearer <secret>`).

    An answer without the secret costs a search of its headers, one of each body chunk and,
    but for the last chunk, one for the secret's first byte in its last `len(secret) - 1`
    (for a token of letters and digits, the only form; else once per form).
    """

    __slots__ = ("_carry", "_forms")

    def __init__(self, authorization: bytes) -> None:
        self._forms = secret_forms(authorization)
        self._carry = b""

    def headers(
        self, headers: list[tuple[bytes, bytes]]
    ) -> tuple[list[tuple[bytes, bytes]], list[str]]:
        """The headers without those holding the secret, and the dropped ones' names, masked."""
        # Names and values run together here, so a find may be false; the check below is not.
        joined = b"".join(chain.from_iterable(headers))
        if not any(form in joined for form in self._forms):
            return headers, []
        kept: list[tuple[bytes, bytes]] = []
        dropped: list[str] = []
        for name, value in headers:
            if any(form in name or form in value for form in self._forms):
                dropped.append(self._masked(name).decode("latin-1"))
            else:
                kept.append((name, value))
        return kept, dropped

    def body(self, chunk: bytes, last: bool) -> tuple[bytes, int]:
        """The body bytes that may go out now, masked, and how many secrets were masked.

        A tail that could be the start of the secret waits for the next chunk, unless `last`.
        """
        data = self._carry + chunk if self._carry else chunk
        self._carry = b""
        found = 0
        for form in self._forms:
            if form in data:
                found += data.count(form)
                data = data.replace(form, _mask(form))
        if last:
            return data, found
        start = min(self._possible_start(data, form) for form in self._forms)
        self._carry = data[start:]
        return data[:start], found

    def _masked(self, data: bytes) -> bytes:
        for form in self._forms:
            data = data.replace(form, _mask(form))
        return data

    @staticmethod
    def _possible_start(data: bytes, form: bytes) -> int:
        """Where the earliest tail of `data` that could begin `form` starts (len: none)."""
        first = form[0]
        start = data.find(first, max(0, len(data) - len(form) + 1))
        while start != -1:
            if form.startswith(data[start:]):
                return start
            start = data.find(first, start + 1)
        return len(data)
