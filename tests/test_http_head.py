"""The one-pass head readers never accept what websockets' parsers would not, nor differently.

:mod:`gateway.http_head` reads the common upgrade heads; anything it does not recognize goes
to websockets' parser. So whenever it returns a result, websockets' parser must have
returned the same one (and consumed the same bytes) on the same input: checked here on
drawn heads, valid and malformed, and on the limits. It must also recognize what real
clients and servers send, or it would save nothing.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request, Response
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.uri import parse_uri
from websockets.utils import accept_key

from gateway.fastpath import scan_request, scan_switching
from gateway.frontdoor import Upgrade, read_upgrade
from gateway.http_head import read_request, read_switching
from gateway.upgrade import check_switching, upgrade_request

T = TypeVar("T")


def websockets_reads(data: bytes, parse: Generator[None, None, T], reader: StreamReader) -> object:
    """What websockets' parser makes of ``data``: (result, bytes consumed), an error, or None."""
    reader.feed_data(data)
    try:
        next(parse)
    except StopIteration as done:
        return done.value, len(data) - len(reader.buffer)
    except Exception as exc:
        return exc
    return None  # it wants more


def websockets_request(data: bytes) -> object:
    reader = StreamReader()
    return websockets_reads(data, Request.parse(reader.read_line), reader)


def websockets_response(data: bytes) -> object:
    reader = StreamReader()
    parse = Response.parse(reader.read_line, reader.read_exact, reader.read_to_eof)
    return websockets_reads(data, parse, reader)


NAMES = st.sampled_from(
    [
        *(b"Host", b"Upgrade", b"Connection", b"X-Auth-Token", b"Content-Length"),
        *(b"transfer-encoding", b"Bad Name", b"", b"N\x80", b"a!#$%&'*+.^_`|~z"),
    ]
)
# Mostly what is valid, so that many drawn heads are complete and well formed.
VALUE_BYTES = st.sampled_from(list(b"aZ09:;/=,\xe9" * 4 + b" \t" * 2 + b"\r\n\x00\x7f\xff"))
VALUES = st.lists(VALUE_BYTES, max_size=8).map(bytes)
SEPARATORS = st.sampled_from([b": ", b": ", b":", b":\t ", b" : ", b""])
ENDS = st.sampled_from([*[b"\r\n"] * 8, b"\n", b"\r"])
DRAWN_FIELDS = st.lists(st.tuples(NAMES, SEPARATORS, VALUES, ENDS).map(b"".join), max_size=4)
# Valid by construction: any token name, any value with blanks around and inside.
TOKENS = st.binary(min_size=1, max_size=6).map(
    lambda raw: bytes(b"-!#$%&'*+.^_`|~0aZ"[byte % 18] for byte in raw)
)
CLEAN = st.binary(max_size=8).map(lambda raw: bytes(b for b in raw if b > 0x20 and b != 0x7F))
VALID_FIELD = st.tuples(
    TOKENS, st.sampled_from([b":", b": ", b":\t"]), CLEAN, st.sampled_from([b"", b" \t", b" "])
).map(lambda parts: parts[0] + parts[1] + parts[2] + parts[3] + parts[2] + parts[3] + b"\r\n")
VALID_FIELDS = st.lists(VALID_FIELD, max_size=6)
FIELDS = st.one_of(VALID_FIELDS, VALID_FIELDS, DRAWN_FIELDS)
REQUEST_LINES = st.sampled_from(
    [
        *[b"GET /v1/p/rtts HTTP/1.1", b"GET /a?b=c&d=%20 HTTP/1.1"] * 5,
        b"GET  HTTP/1.1",
        *(b"POST / HTTP/1.1", b"GET / HTTP/1.0", b"GET / HTTP/1.1 ", b"GET /\x80 HTTP/1.1"),
        *(b"GET\t/ HTTP/1.1", b"get / HTTP/1.1", b"GET / HTTP/1.1\x00", b""),
    ]
)
REQUEST_LINES = st.one_of(REQUEST_LINES, REQUEST_LINES, REQUEST_LINES, st.binary(max_size=24))
STATUS_LINES = st.sampled_from(
    [
        *[b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 101 \t  x"] * 5,
        *(b"HTTP/1.1 101 ", b"HTTP/1.1 101"),
        *(b"HTTP/1.0 101 x", b"HTTP/1.1 0101 x", b"HTTP/1.1 403 Forbidden"),
        *(b"HTTP/1.1 101 \x7f", b"HTTP/1.1 101 \xe9"),
    ]
)
STATUS_LINES = st.one_of(STATUS_LINES, STATUS_LINES, STATUS_LINES, st.binary(max_size=24))
AFTER = st.sampled_from([b"", b"\x81\x05hello", b"GET / HTTP/1.1\r\n\r\n"])


def head(start: bytes, fields: list[bytes], end: bytes, after: bytes) -> bytes:
    return start + b"\r\n" + b"".join(fields) + end + after


def read_as_websockets(data: bytes) -> bool:
    """Whether we read ``data`` as a request; if so, websockets read it the same."""
    ours = read_request(data)
    if ours is None:
        return False
    theirs = websockets_request(data)
    assert isinstance(theirs, tuple), theirs
    request, size = theirs
    assert ours[1] == size
    assert (ours[0].method, ours[0].path, ours[0].protocol) == (
        request.method,
        request.path,
        request.protocol,
    )
    assert list(ours[0].headers.raw_items()) == list(request.headers.raw_items())
    return True


@given(st.sampled_from([b"GET /v1/p/rtts HTTP/1.1", b"GET /a?b=c HTTP/1.1"]), VALID_FIELDS, AFTER)
def test_a_valid_request_is_read_in_one_pass_as_websockets_reads_it(
    start: bytes, fields: list[bytes], after: bytes
) -> None:
    assert read_as_websockets(head(start, fields, b"\r\n", after))


@settings(max_examples=400)
@given(REQUEST_LINES, FIELDS, ENDS, AFTER)
@example(b"GET /v1/p/rtts HTTP/1.1", [b"Host: a\r\n", b"X:  v \t\r\n"], b"\r\n", b"early")
def test_a_request_read_in_one_pass_is_read_so_by_websockets(
    start: bytes, fields: list[bytes], end: bytes, after: bytes
) -> None:
    read_as_websockets(head(start, fields, end, after))


def read_as_websockets_101(data: bytes) -> bool:
    """Whether we read ``data`` as a 101; if so, websockets read it the same."""
    ours = read_switching(data)
    if ours is None:
        return False
    theirs = websockets_response(data)
    assert isinstance(theirs, tuple), theirs
    response, size = theirs
    status, reason, headers, length = ours
    assert length == size
    assert (status, reason, response.body) == (response.status_code, response.reason_phrase, b"")
    assert list(headers.raw_items()) == list(response.headers.raw_items())
    return True


@given(
    st.sampled_from([b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 101 "]), VALID_FIELDS, AFTER
)
def test_a_valid_101_is_read_in_one_pass_as_websockets_reads_it(
    start: bytes, fields: list[bytes], after: bytes
) -> None:
    assert read_as_websockets_101(head(start, fields, b"\r\n", after))


@settings(max_examples=400)
@given(STATUS_LINES, FIELDS, ENDS, AFTER)
@example(b"HTTP/1.1 101 Switching Protocols", [b"Upgrade: websocket\r\n"], b"\r\n", b"\x81\x00")
def test_a_101_read_in_one_pass_is_read_so_by_websockets(
    start: bytes, fields: list[bytes], end: bytes, after: bytes
) -> None:
    read_as_websockets_101(head(start, fields, end, after))


def test_what_real_clients_and_servers_send_is_read_in_one_pass() -> None:
    client = ClientProtocol(parse_uri("ws://127.0.0.1:9000/v1/p/rtts"))
    request = client.connect()
    request.headers["X-Auth-Token"] = "t" * 3000
    data = request.serialize()
    read = read_request(data + b"\x81\x85")
    assert read is not None and read[1] == len(data)
    server = ServerProtocol()
    server.receive_data(data)
    received = server.events_received()[0]
    assert isinstance(received, Request)
    answer = server.accept(received).serialize()
    switching = read_switching(answer)
    assert switching is not None and switching[3] == len(answer)


def test_the_limits_are_websockets_own() -> None:
    line = b"GET / HTTP/1.1\r\n"
    fields = [b"X: v\r\n"] * MAX_NUM_HEADERS
    assert read_request(line + b"".join(fields) + b"\r\n") is not None
    assert read_request(line + b"".join(fields) + b"X: v\r\n\r\n") is None
    longest = b"X: " + b"v" * (MAX_LINE_LENGTH - 5) + b"\r\n"  # the CRLF counts
    assert read_request(line + longest + b"\r\n") is not None
    assert isinstance(websockets_request(line + b"X" + longest + b"\r\n"), Exception)
    assert read_request(line + b"X" + longest + b"\r\n") is None


def test_an_incomplete_head_or_one_with_a_body_is_left_to_websockets() -> None:
    assert read_request(b"GET / HTTP/1.1\r\nHost: a\r\n") is None
    assert read_request(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n") is None
    assert read_switching(b"HTTP/1.1 403 Forbidden\r\n\r\n") is None


# -- the compiled readers (gateway/_heads.c): the same answer as the Python path, or None ----

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = accept_key(KEY.decode()).encode()


class Field:
    """A header a head carries: its usual line, other valid forms of it, invalid ones."""

    def __init__(
        self, line: bytes, valid: tuple[bytes, ...] = (), invalid: tuple[bytes, ...] = ()
    ) -> None:
        self.line, self.valid, self.invalid = line, valid, invalid

    def sent_right(self, optional: bool = False) -> st.SearchStrategy[list[bytes]]:
        """The usual line, another valid form, or (``optional``) none."""
        forms = [[self.line]] * 2 + [[other] for other in self.valid]
        return st.sampled_from(forms + ([[]] if optional else []))

    def sent_any(self, optional: bool = False) -> st.SearchStrategy[list[bytes]]:
        """Mostly right (six in seven); else left out, sent twice, replaced by or sent with an
        invalid form."""
        wrong = [[self.line, self.line], *([] if optional else [[]])]
        wrong += [[other] for other in self.invalid] + [[self.line, o] for o in self.invalid]
        right = self.sent_right(optional)
        return st.one_of(*[right] * 6, st.sampled_from(wrong))


def drawn_head(
    start: st.SearchStrategy[bytes],
    other_starts: st.SearchStrategy[bytes],
    *fields: st.SearchStrategy[list[bytes]],
) -> Any:
    """Heads made of ``fields``' lines and other lines, in any order; mostly valid ones."""
    extra = st.one_of(*[VALID_FIELDS] * 4, DRAWN_FIELDS)
    return _drawn_head(st.one_of(*[start] * 4, other_starts), extra, ENDS, *fields)


def _drawn_head(
    start: st.SearchStrategy[bytes],
    extra: st.SearchStrategy[list[bytes]],
    ends: st.SearchStrategy[bytes],
    *fields: st.SearchStrategy[list[bytes]],
) -> Any:
    lines = st.tuples(*fields, extra).map(
        lambda parts: [line + b"\r\n" for part in parts[:-1] for line in part] + parts[-1]
    )
    return st.tuples(start, lines.flatmap(st.permutations), ends, AFTER).map(
        lambda parts: head(parts[0], parts[1], parts[2], parts[3])
    )


HOST = Field(b"Host: 127.0.0.1:9000", (b"host:a", b"Host: a, b", b"Host:"))
UPGRADE = Field(
    b"Upgrade: websocket",
    (b"upgrade: WebSocket", b"Upgrade:websocket \t"),
    (b"Upgrade: websocket, h2c", b"Upgrade: web socket", b"Upgrade: websocket\x00", b"Upgrade: x"),
)
CONNECTION = Field(
    b"Connection: Upgrade",
    (b"connection: upgrade", b"Connection: UPGRADE "),
    (b"Connection: keep-alive, Upgrade", b"Connection: close", b"Connection: Upgrade,"),
)
KEY_FIELD = Field(
    b"Sec-WebSocket-Key: " + KEY,
    (b"sec-websocket-key:  " + KEY + b" ",),
    (
        *(b"Sec-WebSocket-Key: " + KEY[:-2], b"Sec-WebSocket-Key: " + KEY[1:]),
        *(b"Sec-WebSocket-Key: -" + KEY[1:], b"Sec-WebSocket-Key: " + KEY + b"="),
        b"Sec-WebSocket-Key:",
    ),
)
VERSION = Field(
    b"Sec-WebSocket-Version: 13",
    (b"sec-websocket-version:13",),
    (b"Sec-WebSocket-Version: 8", b"Sec-WebSocket-Version: 13, 8", b"Sec-WebSocket-Version: 013"),
)
AUTHORIZATION = Field(
    b"Authorization: Bearer k", (b"Authorization: Bearer  k \t", b"authorization: Basic \xe9")
)
AGENT = Field(b"User-Agent: rtts-plugin", (), (b"Content-Length: 0", b"Transfer-Encoding: x"))
REQUEST_FIELDS = (HOST, UPGRADE, CONNECTION, KEY_FIELD, VERSION, AUTHORIZATION, AGENT)
OPTIONAL_REQUEST_FIELDS = (HOST, AUTHORIZATION, AGENT)
REQUEST_STARTS = st.sampled_from(
    [b"GET /v1/p/rtts HTTP/1.1", b"GET / HTTP/1.1", b"GET /?a=%20 HTTP/1.1"]
)
VALID_REQUESTS = _drawn_head(
    REQUEST_STARTS,
    VALID_FIELDS,
    st.just(b"\r\n"),
    *(field.sent_right(field in OPTIONAL_REQUEST_FIELDS) for field in REQUEST_FIELDS),
)
UPGRADE_REQUESTS = drawn_head(
    REQUEST_STARTS,
    REQUEST_LINES,
    *(field.sent_any(field in OPTIONAL_REQUEST_FIELDS) for field in REQUEST_FIELDS),
)


def python_reads_upgrade(data: bytes) -> tuple[int, str, str, str | None] | None:
    """What the Python path admits ``data`` as: websockets' parser, then check_upgrade."""
    read = websockets_request(data)
    if not isinstance(read, tuple):
        return None
    request, size = read
    upgrade = read_upgrade(request)
    if not isinstance(upgrade.key, str):
        return None  # refused
    return size, upgrade.path, upgrade.key, upgrade.authorization


@settings(max_examples=300)
@given(VALID_REQUESTS)
def test_a_usual_upgrade_request_is_read_in_c_as_the_python_path_admits_it(data: bytes) -> None:
    scanned = scan_request(data)
    assert scanned is not None
    assert scanned == python_reads_upgrade(data)
    found = read_request(data)  # and the Python path hands the gateway the same
    assert found is not None and read_upgrade(found[0]) == Upgrade(*scanned[1:])


@settings(max_examples=1500)
@given(UPGRADE_REQUESTS)
def test_a_request_read_in_c_is_one_the_python_path_admits_alike(data: bytes) -> None:
    scanned = scan_request(data)
    if scanned is not None:
        assert scanned == python_reads_upgrade(data)


ACCEPT_FIELD = Field(
    b"Sec-WebSocket-Accept: " + ACCEPT,
    (b"sec-websocket-accept:" + ACCEPT + b" ",),
    (
        *(b"Sec-WebSocket-Accept: " + ACCEPT[1:], b"Sec-WebSocket-Accept: " + ACCEPT.lower()),
        b"Sec-WebSocket-Accept:",
    ),
)
SERVER = Field(
    b"Server: stub",
    (),
    (b"Sec-WebSocket-Extensions:", b"Sec-WebSocket-Protocol: rtts", b"Content-Length: 0"),
)
SWITCHING_FIELDS = (UPGRADE, CONNECTION, ACCEPT_FIELD, SERVER)
SWITCHING_STARTS = st.sampled_from([b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 101 "])
VALID_SWITCHING = _drawn_head(
    SWITCHING_STARTS,
    VALID_FIELDS,
    st.just(b"\r\n"),
    *(field.sent_right(field is SERVER) for field in SWITCHING_FIELDS),
)
SWITCHING_HEADS = drawn_head(
    SWITCHING_STARTS,
    STATUS_LINES,
    *(field.sent_any(field is SERVER) for field in SWITCHING_FIELDS),
)


def python_accepts(data: bytes) -> int | None:
    """The size of the 101 the Python path accepts in ``data`` for ``KEY``'s request."""
    read = websockets_response(data)
    if not isinstance(read, tuple):
        return None
    response, size = read
    try:
        check_switching(response, KEY.decode())
    except InvalidHandshake:
        return None
    return size


@settings(max_examples=300)
@given(VALID_SWITCHING)
def test_a_usual_101_is_read_in_c_as_the_python_path_accepts_it(data: bytes) -> None:
    size = scan_switching(data, ACCEPT)
    assert size is not None and size == python_accepts(data)


@settings(max_examples=1500)
@given(SWITCHING_HEADS)
def test_a_101_read_in_c_is_one_the_python_path_accepts_alike(data: bytes) -> None:
    size = scan_switching(data, ACCEPT)
    if size is not None:
        assert size == python_accepts(data)


def test_the_compiled_readers_read_what_real_clients_and_servers_send() -> None:
    client = ClientProtocol(parse_uri("ws://127.0.0.1:9000/v1/p/rtts"))
    request = client.connect()
    data = request.serialize()
    scanned = scan_request(data + b"\x81\x85")
    assert scanned == (len(data), "/v1/p/rtts", request.headers["Sec-WebSocket-Key"], None)
    # The plugin's own request, with a gateway key.
    _, ours, key = upgrade_request("ws://127.0.0.1:9000/v1/p/rtts", {"Authorization": "Bearer k"})
    assert scan_request(ours) == (len(ours), "/v1/p/rtts", key, "Bearer k")
    server = ServerProtocol()
    server.receive_data(data)
    received = server.events_received()[0]
    assert isinstance(received, Request)
    answer = server.accept(received).serialize()
    accept = accept_key(request.headers["Sec-WebSocket-Key"]).encode()
    assert scan_switching(answer + b"\x81\x00", accept) == len(answer)
    assert scan_switching(answer, ACCEPT) is None  # another request's answer


def test_the_compiled_readers_keep_websockets_limits() -> None:
    start = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    start += b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n"
    most = start + b"X: v\r\n" * (MAX_NUM_HEADERS - 4) + b"\r\n"
    assert scan_request(most) is not None
    assert scan_request(most[:-2] + b"X: v\r\n\r\n") is None
    longest = b"X: " + b"v" * (MAX_LINE_LENGTH - 5) + b"\r\n"  # the CRLF counts
    assert scan_request(start + longest + b"\r\n") is not None
    assert scan_request(start + b"X" + longest + b"\r\n") is None
    assert scan_request(start) is None  # incomplete
    with pytest.raises(TypeError):
        scan_request("GET / HTTP/1.1\r\n\r\n")  # type: ignore[arg-type]
