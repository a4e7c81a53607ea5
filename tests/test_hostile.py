"""Hostile input, thrown by hypothesis at a running gateway (and so at the local engine too).

Every case must end with a protocol ERROR, a refused handshake, a close with a proper code,
or (for a valid request) a normal session; the server never crashes or hangs, its memory
stays bounded, and it answers the next normal request correctly.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.server import RunningGateway, run_gateway
from gateway.settings import GatewaySettings
from tests.support import examples_timeout, exchange, start

# Proper endings: normal, protocol error, bad UTF-8, too big (RFC 6455 §7.4.1).
PROPER_CLOSE_CODES = {1000, 1002, 1007, 1009}
FIELDS = ("audio_format", "sample_rate", "property", "speed", "pitch", "volume", "subtitle")

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
boundaries = {
    "speed": st.sampled_from([-501, -500, 0, 500, 501, 1.5, "0", True]),
    "pitch": st.sampled_from([-501, -500, 500, 501, None, []]),
    "volume": st.sampled_from([-1, 0, 100, 101, 50.0, "50"]),
    "sample_rate": st.sampled_from(["8000", "16000", 8000, 16000, "22050", "", 0, None]),
    "audio_format": st.sampled_from(["pcm", "alaw", "ulaw", "mp3", "wav", "PCM", "", None]),
    "property": st.sampled_from(
        [
            "english_amy_common",
            "chinese_huaxiaomei_common",
            "chinese_huaxiaolong_common",
            "nobody",
            "",
            None,
        ]
    ),
    "subtitle": st.sampled_from(["word_level", "phoneme_level", "sentence", None, 1]),
}
configs = st.fixed_dictionaries(
    {}, optional={name: st.one_of(boundaries[name], json_values) for name in FIELDS}
)
texts = st.one_of(
    st.text(max_size=40),
    st.text(
        alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Lo"]), max_size=30
    ),
    st.sampled_from(["好" * 500, "好" * 501, "a" * 10_000, "a" * 10_001, " ", ""]),
    json_values,
)
starts = st.builds(
    lambda command, text, config, drop: json.dumps(
        {
            k: v
            for k, v in {"command": command, "text": text, "config": config}.items()
            if k not in drop
        }
    ),
    st.sampled_from(["START", "START", "STOP", "start", "", None, 5]),
    texts,
    st.one_of(configs, json_values),
    st.sets(st.sampled_from(["command", "text", "config"]), max_size=1),
)
messages = st.one_of(
    starts,
    st.binary(max_size=64),
    st.text(max_size=64),
    st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 3000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
    st.just('{"command": "START", "text": "' + "x" * 300_000 + '"}'),  # over the size limit
    st.binary(min_size=1, max_size=16).map(lambda b: ("invalid-utf8", b"\xff\xfe" + b)),
)


def _examples() -> int:
    """RTTS_HOSTILE_EXAMPLES: the README's command for more and fresh examples sets 20000."""
    given = os.environ.get("RTTS_HOSTILE_EXAMPLES", "3000")
    if not given.isdigit() or int(given) < 1:
        raise pytest.UsageError(
            f"RTTS_HOSTILE_EXAMPLES must be a whole number above 0, got {given!r}"
        )
    return int(given)


EXAMPLES = _examples()

# One gateway (and event loop) for the whole module: it must survive every case in turn.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hostile_gateway() -> AsyncIterator[RunningGateway]:
    async with run_gateway(
        GatewaySettings(port=0, metrics_port=0, idle_timeout=1.0, drain_timeout=1.0)
    ) as running:
        yield running


async def throw(url: str, payloads: list[Any]) -> tuple[list[dict[str, Any]], int | None]:
    """Send the payloads; return the JSON messages received and the close code."""
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(10):  # a hang fails the example
        try:
            async with connect(url, compression=None, proxy=None, max_size=None) as ws:
                try:
                    for payload in payloads:
                        if isinstance(payload, tuple):  # text frame with bytes that are not UTF-8
                            await ws.send(payload[1], text=True)
                        else:
                            await ws.send(payload)
                    async for message in ws:
                        if isinstance(message, str):
                            received.append(json.loads(message))
                except ConnectionClosed:
                    pass
                return received, ws.close_code
        except InvalidStatus as exc:
            return [{"refused": exc.response.status_code}], None


def check_ending(received: list[dict[str, Any]], code: int | None) -> None:
    if received and "refused" in received[0]:
        assert 400 <= received[0]["refused"] < 500
        return
    assert code in PROPER_CLOSE_CODES, (code, received[-3:])
    kinds = [m["resp_type"] for m in received]
    if "ERROR" in kinds or "FATAL_ERROR" in kinds:
        failure = next(m for m in received if m["resp_type"] in ("ERROR", "FATAL_ERROR"))
        assert (
            failure["error_code"].startswith("SIS.")
            and failure["error_msg"]
            and failure["trace_id"]
        )
    elif kinds:
        assert kinds[0] == "START" and kinds[-1] == "END", kinds


@pytest.mark.timeout(examples_timeout(EXAMPLES))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payloads=st.lists(messages, min_size=1, max_size=3))
async def test_hostile_messages_end_properly(
    hostile_gateway: RunningGateway, payloads: list[Any]
) -> None:
    received, code = await throw(hostile_gateway.url(), payloads)
    check_ending(received, code)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=60),
    header=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300),
    subprotocols=st.lists(st.sampled_from(["rtts", "chat", "x-y", "a" * 20, ""]), max_size=3),
    method=st.sampled_from(["GET", "GET", "POST", "HEAD"]),
)
async def test_unusual_paths_headers_and_subprotocols(
    hostile_gateway: RunningGateway, path: str, header: str, subprotocols: list[str], method: str
) -> None:
    # A raw HTTP upgrade, so nothing is cleaned up by a client library on the way.
    request = (
        f"{method} /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"X-Odd: {header}\r\nSec-WebSocket-Protocol: {', '.join(subprotocols)}\r\n\r\n"
    )
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", hostile_gateway.port)
        writer.write(request.encode())
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        await writer.wait_closed()
    status = int(status_line.split()[1]) if status_line.startswith(b"HTTP/1.1 ") else 0
    # 101 for an rtts path, else a refusal; never a 5xx and never a dropped connection.
    assert status in (101, 400, 404, 405, 426), status_line


async def test_server_survives_and_stays_bounded(hostile_gateway: RunningGateway) -> None:
    # Runs after the property tests in this module: the same gateway must still be sound.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        seen = await exchange(
            hostile_gateway.url(),
            start("Still standing.", property="english_amy_common", sample_rate="16000"),
        )
        assert seen.kinds == ["START", "AUDIO", "END"] and len(seen.audio) > 16000
    assert await _idle(hostile_gateway)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"peak memory grew {grown_mib:.0f} MiB"


async def test_slowloris_connections_are_dropped_and_others_served() -> None:
    async with run_gateway(
        GatewaySettings(port=0, metrics_port=0, idle_timeout=0.5, max_sessions=300)
    ) as running:
        idle = [await connect(running.url(), proxy=None) for _ in range(150)]
        try:
            seen = await exchange(
                running.url(), start("Served anyway.", property="english_amy_common")
            )
            assert seen.kinds == ["START", "AUDIO", "END"]
            endings = await asyncio.gather(*(_ending(ws) for ws in idle))
        finally:
            for ws in idle:
                await ws.close()
        assert all(kinds == ["FATAL_ERROR"] and code == 1000 for kinds, code in endings), endings[
            :3
        ]
        assert await _idle(running)


async def _ending(ws: Any) -> tuple[list[str], int | None]:
    kinds = []
    async with asyncio.timeout(15):
        async for message in ws:
            kinds.append(json.loads(message)["resp_type"])
    return kinds, ws.close_code


async def _idle(running: RunningGateway) -> bool:
    for _ in range(200):
        if not running.gateway.active_sessions and (
            running.engine is None or not running.engine.active_sessions
        ):
            return True
        await asyncio.sleep(0.05)
    return False
