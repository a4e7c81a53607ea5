"""The one-pass head readers never accept what websockets' parsers would not, nor differently.

:mod:`gateway.http_head` reads the common upgrade heads; anything it does not recognize goes
to websockets' parser. So whenever it returns a result, websockets' parser must have
returned the same one (and consumed the same bytes) on the same input: checked here on
drawn heads, valid and malformed, and on the limits. It must also recognize what real
clients and servers send, or it would save nothing.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

from hypothesis import example, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request, Response
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.uri import parse_uri

from gateway.http_head import read_request, read_switching

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
