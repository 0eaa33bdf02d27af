"""No method override: nothing may make InvoisX run another method than the one the policy
checked.

Laravel runs a POST as the method named by `_method` in the query, a form body or a JSON
body. The query and the body's type are checked on the head; a JSON body is scanned as it
streams (`JsonKeyScan`), since reading it whole first would hold every upload in memory.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl

from starlette.types import Scope

from proxy import errors

__all__ = ["JsonKeyScan", "check_no_method_override"]

# Laravel runs a POST as the method named by `_method` in the query, a form body or a JSON
# body (Symfony's `Request::getMethod()`; Laravel fills the request bag from JSON). The checks
# below read each as PHP and Laravel do; the override headers never go upstream
# (`upstream.headers`).
_FORM_BODIES = (b"application/x-www-form-urlencoded", b"multipart/form-data")
# PHP cuts a content type at the first of these (`sapi_read_post_data()`).
_MEDIA_TYPE_END = re.compile(rb"[;, ]")
_OVERRIDE = "_method"


def _php_variable(key: str) -> str:
    """The variable a query key sets in PHP (`php_register_variable_ex()`): cut at NUL,
    leading spaces stripped, ' ' and '.' as '_', and an unclosed '[' as '_'."""
    name = key.partition("\0")[0].lstrip(" ")
    base, bracket, rest = name.partition("[")
    if bracket and "]" not in rest:
        base, bracket = f"{base}_{rest}", ""
    return base.replace(" ", "_").replace(".", "_")


def check_no_method_override(scope: Scope) -> JsonKeyScan | None:
    """Refuse what could make InvoisX run another method than the one the policy checked.

    Returns a scan for the body when InvoisX would read a `_method` from it (a JSON POST).
    """
    query: bytes = scope["query_string"]
    if query:
        keys = (key for key, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True))
        if any(_php_variable(key) == _OVERRIDE for key in keys):
            raise errors.override_refused("query parameter")
    types = [value for name, value in scope["headers"] if name == b"content-type"]
    if len(types) > 1:
        raise errors.two_content_types()
    media_type = _MEDIA_TYPE_END.split(types[0].strip().lower(), 1)[0] if types else b""
    if media_type in _FORM_BODIES:
        raise errors.form_body()
    # Laravel reads JSON from any type containing "/json" or "+json"; the proxy sends
    # application/json for a body without a type.
    if scope["method"] == "POST" and (not types or b"json" in types[0].lower()):
        return JsonKeyScan()
    return None


# A key longer than this cannot decode to `_method` (7 characters, at most 6 bytes each).
_MAX_KEY_BYTES = 64
_STRUCTURE = re.compile(rb'["{}\[\],]')
_IN_STRING = re.compile(rb'["\\]')
_WHITESPACE = re.compile(rb"[ \t\r\n]*")


class JsonKeyScan:
    """Reads a JSON body chunk by chunk, as it is forwarded, and refuses it (400) when its
    top-level object has a `_method` key. Holds at most one key's bytes between chunks.

    Valid JSON is read exactly (strings, escapes, nesting); anything else is passed over,
    since PHP's `json_decode` gives null for it and Laravel then reads no `_method` at all.
    """

    __slots__ = ("_depth", "_done", "_escaped", "_expect_key", "_in_string", "_key")

    def __init__(self) -> None:
        self._depth = 0  # 1 inside the top-level object
        self._done = False
        self._in_string = False
        self._escaped = False  # a backslash ended the last chunk
        self._expect_key = False
        self._key: bytearray | None = None  # the top-level key being read, while short

    def feed(self, data: bytes) -> None:
        """Scan the next chunk of the body; raises `ProxyError` on a `_method` key."""
        position, end = 0, len(data)
        while position < end and not self._done:
            if self._in_string:
                position = self._string(data, position)
            elif self._depth == 0:
                position = _WHITESPACE.match(data, position).end()  # type: ignore[union-attr]
                if position < end:
                    # Not an object: Laravel gets a list or a scalar, never a `_method` key.
                    self._done = data[position] != ord("{")
                    self._depth, self._expect_key = 1, True
                    position += 1
            else:
                position = self._structure(data, position)

    def _string(self, data: bytes, position: int) -> int:
        if self._escaped:
            self._escaped = False
            self._keep(data[position : position + 1])
            position += 1
        found = _IN_STRING.search(data, position)
        stop = len(data) if found is None else found.start()
        self._keep(data[position:stop])
        if found is None:
            return stop
        if data[stop] == ord("\\"):
            self._keep(b"\\")
            self._escaped = True
            return stop + 1
        self._in_string = False
        if self._key is not None:
            key, self._key = bytes(self._key), None
            self._check(key)
        return stop + 1

    def _structure(self, data: bytes, position: int) -> int:
        found = _STRUCTURE.search(data, position)
        if found is None:
            return len(data)
        char = data[found.start()]
        if char == ord('"'):
            self._in_string = True
            if self._depth == 1 and self._expect_key:
                self._expect_key = False
                self._key = bytearray()
        elif char in b"{[":
            self._depth += 1
        elif char in b"}]":
            self._depth -= 1
            self._done = self._depth == 0
        elif self._depth == 1:  # a comma between members
            self._expect_key = True
        return found.end()

    def _keep(self, part: bytes) -> None:
        key = self._key
        if key is None:
            return
        if len(key) + len(part) > _MAX_KEY_BYTES:
            self._key = None  # too long to be `_method`
        else:
            key += part

    @staticmethod
    def _check(raw: bytes) -> None:
        try:
            key = json.loads(b'"%b"' % raw)
        except ValueError:
            return  # not valid JSON: PHP reads the whole body as null
        if key == _OVERRIDE:
            raise errors.override_refused("key in the JSON body")
