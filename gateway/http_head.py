"""The common upgrade heads, read in one pass; anything else is left to websockets' parser.

Every session's handshake reads two HTTP heads: the client's upgrade request and the
upstream's 101. websockets' parsers (:meth:`websockets.http11.Request.parse`,
:meth:`~websockets.http11.Response.parse`) read them a line at a time through generators,
which is most of the gateway's own time on a caller's handshake. The functions here read a
head that arrived whole in one pass, and only recognize heads websockets accepts, with the
same result; for any other head (incomplete, malformed, too long, with a body, a refusal)
they return ``None`` and the caller uses websockets' parser, so every error, limit and
message stays websockets'. ``tests/test_http_head.py`` holds the two to that. On the compiled
path (``--relay``) ``gateway/_heads.c`` reads and checks the usual heads before these are
tried (:func:`gateway.fastpath.scan_request`, :func:`~gateway.fastpath.scan_switching`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from websockets.datastructures import Headers
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request

HEAD_END: Final = b"\r\n\r\n"
# websockets' rules (RFC 9110 field names and values), the value without its outer blanks.
_FIELD: Final = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*"
    rb"((?:[\x21-\x7e\x80-\xff](?:[\x09\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?)[ \t]*"
).fullmatch
_REQUEST_LINE: Final = re.compile(rb"GET ([\x21-\x7e]+) HTTP/1\.1").fullmatch
_SWITCHING_LINE: Final = re.compile(rb"HTTP/1\.1 101 ([\x09\x20-\x7e\x80-\xff]*)").fullmatch
# Headers that make websockets read or refuse a body: always its parser's call.
_BODY_HEADERS: Final = frozenset({"content-length", "transfer-encoding"})


def _fields(lines: list[bytes]) -> Headers | None:
    """The header lines (each without its CRLF) as websockets' ``Headers``, or None."""
    if len(lines) > MAX_NUM_HEADERS:
        return None
    headers = Headers()
    for line in lines:
        field = _FIELD(line)
        if field is None or len(line) + 2 > MAX_LINE_LENGTH:
            return None
        name = field[1].decode("ascii")
        if name.lower() in _BODY_HEADERS:
            return None
        headers.set_insecure(name, field[2].decode("iso-8859-1"))  # validated just above
    return headers


def _head(
    data: bytes | bytearray, first_line: Callable[[bytes], re.Match[bytes] | None]
) -> tuple[re.Match[bytes], Headers, int] | None:
    """A whole head at the start of ``data``: its first line's match, headers and length.

    ``None`` if the head is incomplete, its first line is not ``first_line``'s or a header
    line is invalid.
    """
    end = data.find(HEAD_END)
    if end < 0:
        return None
    lines = bytes(data[:end]).split(b"\r\n")
    if len(lines[0]) + 2 > MAX_LINE_LENGTH:
        return None
    start = first_line(lines[0])
    headers = _fields(lines[1:])
    if start is None or headers is None:
        return None
    return start, headers, end + len(HEAD_END)


def read_request(data: bytes | bytearray) -> tuple[Request, int] | None:
    """An upgrade request at the start of ``data`` and its length, if websockets reads it so.

    ``None``: incomplete, or anything but a plain ``GET ... HTTP/1.1`` with valid headers
    and no body; websockets' parser then decides.
    """
    found = _head(data, _REQUEST_LINE)
    if found is None:
        return None
    request_line, headers, size = found
    return Request(request_line[1].decode("ascii"), headers, "GET", "HTTP/1.1"), size


def read_switching(data: bytes | bytearray) -> tuple[int, str, Headers, int] | None:
    """A 101 head at the start of ``data``: status, reason, headers, length; else ``None``.

    ``None`` for a refusal (it has a body), an incomplete or malformed head: websockets'
    parser then decides. A 101 has no body: what follows its head is the first frames.
    """
    found = _head(data, _SWITCHING_LINE)
    if found is None:
        return None
    status_line, headers, size = found
    return 101, status_line[1].decode("iso-8859-1"), headers, size
