"""Both sides' upgrade checks and the upstream's request, held to what websockets does.

:mod:`gateway.upgrade` does what websockets' ``ClientProtocol`` does for a handshake without
building one per session; these tests hold it to that: the same request bytes, and the same
verdict (accepted, or refused with the same exception type) on valid and invalid answers.
"""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, InvalidHeader, InvalidHeaderValue, InvalidStatus
from websockets.headers import parse_connection, parse_upgrade
from websockets.http11 import Request, Response
from websockets.uri import parse_uri
from websockets.utils import accept_key

from gateway.fastpath import scan_request
from gateway.frontdoor import check_upgrade, upgrade_headers
from gateway.upgrade import USER_AGENT, check_switching, upgrade_request

URLS = [
    "ws://127.0.0.1:8080/v1/p/rtts",
    "wss://sis-ext.cn-north-4.myhuaweicloud.com/v1/p/rtts",
    "wss://sis-ext.example.com:8443/v1/p/rtts",
    "ws://[::1]:9000/v1/p/rtts?trace=1",
    "ws://user:pa%20ss@localhost/v1/p/rtts",
]
HEADERS = [
    {},
    {"X-Auth-Token": "token", "Enterprise-Project-Id": "ep"},
    {"Authorization": "Bearer k", "user-agent": "mine/1"},
]


def websockets_request(url: str, headers: dict[str, str], key: str) -> bytes:
    """What the upstream socket used to send: websockets' request, our headers added."""
    protocol = ClientProtocol(parse_uri(url))
    protocol.key = key
    request = protocol.connect()
    request.headers.update(headers)
    request.headers.setdefault("User-Agent", USER_AGENT)
    return request.serialize()


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("headers", HEADERS)
def test_the_request_is_the_one_websockets_builds(url: str, headers: dict[str, str]) -> None:
    uri, request, key = upgrade_request(url, headers)
    assert uri == parse_uri(url)
    assert request == websockets_request(url, headers, key)


def test_every_request_has_its_own_key() -> None:
    keys = {upgrade_request(URLS[0], {})[2] for _ in range(20)}
    assert len(keys) == 20


def test_a_header_value_that_would_add_a_header_is_refused() -> None:
    with pytest.raises(InvalidHeaderValue):
        upgrade_request(URLS[0], {"X-Auth-Token": "t\r\nX-Injected: 1"})


KEY = "dGhlIHNhbXBsZSBub25jZQ=="
GOOD = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Accept", accept_key(KEY)),
]
ANSWERS: dict[str, tuple[int, list[tuple[str, str]]]] = {
    "valid": (101, GOOD),
    "valid, server's casing and lists": (
        101,
        [("Upgrade", "WebSocket"), ("Connection", "keep-alive, Upgrade"), GOOD[2]],
    ),
    "a refusal": (403, [("Content-Length", "0")]),
    "no Connection": (101, [GOOD[0], GOOD[2]]),
    "Connection without upgrade": (101, [GOOD[0], ("Connection", "close"), GOOD[2]]),
    "no Upgrade": (101, [GOOD[1], GOOD[2]]),
    "another protocol": (101, [("Upgrade", "h2c"), GOOD[1], GOOD[2]]),
    "two protocols": (101, [("Upgrade", "websocket, h2c"), GOOD[1], GOOD[2]]),
    "no accept": (101, GOOD[:2]),
    "two accepts": (101, [*GOOD, GOOD[2]]),
    "wrong accept": (101, [*GOOD[:2], ("Sec-WebSocket-Accept", accept_key("x" * 24))]),
    "an extension nobody offered": (
        101,
        [*GOOD, ("Sec-WebSocket-Extensions", "permessage-deflate")],
    ),
    "a subprotocol nobody offered": (101, [*GOOD, ("Sec-WebSocket-Protocol", "chat")]),
}


def websockets_verdict(response: Response) -> type[Exception] | None:
    protocol = ClientProtocol(parse_uri(URLS[0]))
    protocol.key = KEY
    try:
        protocol.process_response(response)
    except InvalidHandshake as exc:
        return type(exc)
    return None


@pytest.mark.parametrize("name", ANSWERS)
def test_an_answer_gets_the_verdict_websockets_gives(name: str) -> None:
    status, headers = ANSWERS[name]
    response = Response(status, "reason", Headers(headers))
    expected = websockets_verdict(response)
    if expected is None:
        check_switching(response, KEY)
        assert name.startswith("valid")
    else:
        assert not name.startswith("valid")
        with pytest.raises(expected):
            check_switching(response, KEY)


def test_a_refusal_keeps_its_response() -> None:
    response = Response(429, "Too Many Requests", Headers({"Retry-After": "3"}), b"{}")
    with pytest.raises(InvalidStatus) as refused:
        check_switching(response, KEY)
    assert refused.value.response is response


# -- the front door's checks of a client's upgrade request ---------------------------------------


def listed(connection: list[str], upgrade: list[str]) -> object:
    """websockets' list parsers on these values: the lowercase lists, or the error type."""
    try:
        return (
            [o.lower() for value in connection for o in parse_connection(value)],
            [p.lower() for value in upgrade for p in parse_upgrade(value)],
        )
    except InvalidHeader as exc:
        return type(exc)


@pytest.mark.parametrize(
    ("connection", "upgrade"),
    [
        (["Upgrade"], ["websocket"]),
        (["upgrade"], ["WebSocket"]),
        (["keep-alive, Upgrade"], ["websocket"]),
        (["Upgrade"], ["websocket/13"]),
        (["Upgrade"], ["websocket, h2c"]),
        ([""], ["websocket"]),
        (["Upgrade"], [""]),
        (["Upgr ade"], ["websocket"]),
        (["Upgrade,"], ["websocket"]),
        (["Upgrade", "close"], ["websocket"]),
        ([], ["websocket"]),
        (["Upgrade"], []),
        (["Upgrade"], ["web\tsocket"]),
    ],
)
def test_the_upgrade_headers_are_read_as_websockets_reads_them(
    connection: list[str], upgrade: list[str]
) -> None:
    headers = Headers([("Connection", value) for value in connection])
    headers.update([("Upgrade", value) for value in upgrade])
    expected = listed(connection, upgrade)
    if isinstance(expected, tuple):
        assert upgrade_headers(headers) == expected
    else:
        with pytest.raises(expected):
            upgrade_headers(headers)


@given(st.text(alphabet="AZaz09+/=-_ \t\x80", min_size=0, max_size=26))
@example("dGhlIHNhbXBsZSBub25jZQ==")
@example("dGhlIHNhbXBsZSBub25jZR==")  # non-zero trailing bits: base64 still decodes it
def test_a_key_is_valid_when_base64_decodes_it_to_16_bytes(key: str) -> None:
    try:
        expected = len(base64.b64decode(key.encode(), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        expected = False
    request = Request(
        "/v1/p/rtts",
        Headers(
            {
                "Host": "x",
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": key,
                "Sec-WebSocket-Version": "13",
            }
        ),
    )
    assert (check_upgrade(request) == key) is expected
    # The compiled reader admits the same keys (blanks around a value are not part of it).
    if key == key.strip(" \t"):
        raw = "".join(f"{name}: {value}\r\n" for name, value in request.headers.raw_items())
        scanned = scan_request(f"GET /v1/p/rtts HTTP/1.1\r\n{raw}\r\n".encode("iso-8859-1"))
        assert (scanned is not None and scanned[2] == key) is expected
