"""The client side of an upstream's opening handshake, sans I/O: the request and its answer.

What websockets' :class:`~websockets.client.ClientProtocol` does for a handshake, without
building a protocol object per session for a socket that is handed to the splice at once:
the request is the same bytes (its constant part built once per URL), and the answer (read
by :mod:`gateway.http_head` or websockets' own HTTP parser) is checked as RFC 6455 §4.1 and
websockets require, raising websockets' exceptions. No extension and no
subprotocol is offered, so an answer that selects one is refused.
"""

from __future__ import annotations

import base64
import functools
import os
import re
from collections.abc import Mapping
from typing import Final

from websockets.exceptions import (
    InvalidHeader,
    InvalidHeaderValue,
    InvalidStatus,
    InvalidUpgrade,
    NegotiationError,
)
from websockets.headers import (
    build_authorization_basic,
    build_host,
    parse_connection,
    parse_upgrade,
)
from websockets.http11 import Response
from websockets.uri import WebSocketURI, parse_uri
from websockets.utils import accept_key

USER_AGENT: Final = "rtts-plugin"
# What websockets' Headers accepts as a value (no CR or LF: a value cannot add a header).
_HEADER_VALUE: Final = re.compile(r"[\x09\x20-\x7e\x80-\xff]*").fullmatch


@functools.lru_cache(maxsize=256)  # a gateway opens the same few URLs (one per project)
def _head(url: str) -> tuple[WebSocketURI, bytes]:
    """``url`` parsed, and its request up to the key (request line, Host, upgrade headers)."""
    uri = parse_uri(url)
    host = build_host(uri.host, uri.port, uri.secure)
    head = f"GET {uri.resource_name} HTTP/1.1\r\nHost: {host}\r\n"
    if uri.user_info:
        head += f"Authorization: {build_authorization_basic(*uri.user_info)}\r\n"
    head += "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
    return uri, head.encode("iso-8859-1")


@functools.lru_cache(maxsize=256)  # the same credentials for every session (but AK/SK's date)
def _tail(headers: tuple[tuple[str, str], ...]) -> bytes:
    """The request after the key: the version, ``headers`` and the User-Agent, checked."""
    lines = ["\r\nSec-WebSocket-Version: 13\r\n"]
    agent = True
    for name, value in headers:
        if not _HEADER_VALUE(value):
            raise InvalidHeaderValue(name, value)
        lines.append(f"{name}: {value}\r\n")
        agent = agent and name.lower() != "user-agent"
    if agent:
        lines.append(f"User-Agent: {USER_AGENT}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("iso-8859-1")


_KEYS: list[bytes] = []


def _next_key() -> bytes:
    """A fresh ``Sec-WebSocket-Key``: 16 random bytes in base64 (RFC 6455 §4.1).

    Drawn 64 at a time: one call to the OS's random source instead of one per session.
    """
    if not _KEYS:
        batch = os.urandom(16 * 64)
        _KEYS.extend(base64.b64encode(batch[at : at + 16]) for at in range(0, len(batch), 16))
    return _KEYS.pop()


def upgrade_request(url: str, headers: Mapping[str, str]) -> tuple[WebSocketURI, bytes, str]:
    """The parsed ``url``, the upgrade request for it carrying ``headers``, and its key.

    The headers follow websockets' own (``User-Agent: rtts-plugin`` unless given).

    Raises:
        InvalidURI: ``url`` is not a ws:// or wss:// URL.
        InvalidHeaderValue: a header value holds a character HTTP does not allow (CR, LF...).
    """
    uri, head = _head(url)
    key = _next_key()
    return uri, head + key + _tail(tuple(headers.items())), key.decode()


def check_switching(response: Response, key: str) -> None:
    """Accept ``response`` to the request with ``key`` as an upgrade, or raise why not.

    Raises:
        InvalidStatus: anything but 101 (a refusal; its body is in the response).
        InvalidUpgrade, InvalidHeader, InvalidHeaderValue, NegotiationError: a 101 that is
            not a valid answer to this request.
    """
    if response.status_code != 101:
        raise InvalidStatus(response)
    headers = response.headers
    connection, upgrade = headers.get_all("Connection"), headers.get_all("Upgrade")
    # What every server sends needs no list parsing; anything else gets websockets' checks.
    if not (
        len(connection) == len(upgrade) == 1
        and connection[0].lower() == "upgrade"
        and upgrade[0].lower() == "websocket"
    ):
        _check_upgrade_lists(connection, upgrade)
    accepts = headers.get_all("Sec-WebSocket-Accept")
    if not accepts:
        raise InvalidHeader("Sec-WebSocket-Accept")
    if len(accepts) > 1:
        raise InvalidHeader("Sec-WebSocket-Accept", "multiple values")
    if accepts[0] != accept_key(key):
        raise InvalidHeaderValue("Sec-WebSocket-Accept", accepts[0])
    if headers.get_all("Sec-WebSocket-Extensions"):
        raise NegotiationError("no extensions supported")
    if headers.get_all("Sec-WebSocket-Protocol"):
        raise NegotiationError("no subprotocols supported")


def _check_upgrade_lists(connection_values: list[str], upgrade_values: list[str]) -> None:
    connection = [option for value in connection_values for option in parse_connection(value)]
    if not any(option.lower() == "upgrade" for option in connection):
        raise InvalidUpgrade("Connection", ", ".join(connection) or None)
    upgrade = [protocol for value in upgrade_values for protocol in parse_upgrade(value)]
    # Case-insensitive, as websockets is with servers that send "WebSocket".
    if len(upgrade) != 1 or upgrade[0].lower() != "websocket":
        raise InvalidUpgrade("Upgrade", ", ".join(upgrade) or None)
