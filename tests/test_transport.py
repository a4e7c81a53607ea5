"""The asyncio transport against the local engine, and against scripted misbehaving servers."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from gateway.server import RunningGateway
from rtts_plugin.errors import HandshakeError, RttsTimeoutError, SynthesisError
from rtts_plugin.protocol import (
    AudioReceived,
    Ended,
    Started,
    StartRequest,
    SynthesisConfig,
    WordsReceived,
)
from rtts_plugin.transport import SynthesisTimings, Timeouts, stream_synthesis

Script = Callable[[ServerConnection], Awaitable[None]]


def request(text: str = "Hello there, caller.", **config: object) -> StartRequest:
    return StartRequest(command="START", text=text, config=SynthesisConfig.model_validate(config))


@asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[str]:
    async with serve(script, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/p/rtts"


async def collect(url: str, req: StartRequest, **kwargs: object) -> list[object]:
    return [event async for event in stream_synthesis(url, req, **kwargs)]  # type: ignore[arg-type]


async def test_events_and_timings_from_the_engine(gateway: RunningGateway) -> None:
    timings = SynthesisTimings()
    events = await collect(
        gateway.url(),
        request(property="chinese_huaxiaomei_common", subtitle="word_level", sample_rate="16000"),
        timings=timings,
    )
    assert isinstance(events[0], Started) and isinstance(events[-1], Ended)
    assert any(isinstance(e, WordsReceived) for e in events)
    audio = b"".join(e.data for e in events if isinstance(e, AudioReceived))
    assert len(audio) == timings.audio_bytes > 16000
    assert timings.trace_id == events[0].trace_id
    assert (
        timings.connected is not None
        and timings.started is not None
        and timings.first_audio is not None
    )
    assert timings.ended is not None
    assert timings.connected <= timings.started <= timings.first_audio <= timings.ended


async def test_server_error_carries_code_and_trace_id(gateway: RunningGateway) -> None:
    with pytest.raises(SynthesisError) as caught:
        await collect(
            gateway.url(), request(property="chinese_huaxiaolong_common", sample_rate="8000")
        )
    error = caught.value
    assert error.error_code == "SIS.0402" and error.kind == "error" and error.trace_id
    assert "SIS.0402" in str(error) and error.trace_id in str(error)


async def test_wrong_path_is_a_handshake_error_with_the_apig_code(gateway: RunningGateway) -> None:
    with pytest.raises(HandshakeError) as caught:
        await collect(f"ws://127.0.0.1:{gateway.port}/v1/rtts", request())
    assert (caught.value.status, caught.value.error_code) == (404, "APIG.0101")


async def test_refused_connection_is_a_handshake_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(HandshakeError) as caught:
        await collect(f"ws://127.0.0.1:{port}/v1/p/rtts", request())
    assert caught.value.status == 0 and "cannot connect" in str(caught.value)


async def test_no_start_times_out() -> None:
    async def silent(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.wait_closed()

    async with scripted_server(silent) as url:
        with pytest.raises(RttsTimeoutError) as caught:
            await collect(url, request(), timeouts=Timeouts(start=0.2))
    assert caught.value.phase == "START"


async def test_silence_after_audio_times_out_with_the_trace_id() -> None:
    async def stalls(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(json.dumps({"resp_type": "START", "trace_id": "t-1"}))
        await ws.send(b"\x00\x00")
        await ws.wait_closed()

    async with scripted_server(stalls) as url:
        with pytest.raises(RttsTimeoutError) as caught:
            await collect(url, request(), timeouts=Timeouts(gap=0.2))
    assert (caught.value.phase, caught.value.trace_id) == ("audio", "t-1")


async def test_close_without_end_is_an_error_not_a_success() -> None:
    async def hangs_up(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(json.dumps({"resp_type": "START", "trace_id": "t-2"}))
        await ws.send(b"\x00\x00")

    async with scripted_server(hangs_up) as url:
        with pytest.raises(SynthesisError) as caught:
            await collect(url, request())
    assert (
        caught.value.kind == "closed"
        and "before END" in str(caught.value)
        and "t-2" in str(caught.value)
    )


async def test_start_request_is_sent_as_documented() -> None:
    seen: list[str] = []

    async def records(ws: ServerConnection) -> None:
        seen.append(str(await ws.recv()))
        await ws.send(json.dumps({"resp_type": "START", "trace_id": "x"}))
        await ws.send(json.dumps({"resp_type": "END", "trace_id": "x", "reason": "NORMAL"}))

    async with scripted_server(records) as url:
        await collect(
            url, request("你好", property="chinese_xiaoqi_common", sample_rate="16000", speed=100)
        )
    assert json.loads(seen[0]) == {
        "command": "START",
        "text": "你好",
        "config": {
            "audio_format": "pcm",
            "sample_rate": "16000",
            "property": "chinese_xiaoqi_common",
            "speed": 100,
            "pitch": 0,
            "volume": 50,
        },
    }


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_refused_and_credentials_stay_home(status: int) -> None:
    """A 3xx is a refusal: nothing, least of all the token, reaches the host it points to."""
    elsewhere_saw: list[dict[str, str]] = []

    def record(connection: ServerConnection, req: Request) -> None:
        elsewhere_saw.append(dict(req.headers))

    async def unused(ws: ServerConnection) -> None:
        await ws.close()

    async with serve(unused, "127.0.0.1", 0, process_request=record) as elsewhere:
        target = f"ws://127.0.0.1:{elsewhere.sockets[0].getsockname()[1]}/v1/p/rtts"

        def redirect(connection: ServerConnection, req: Request) -> Response:
            response = connection.respond(HTTPStatus(status), "moved\n")
            response.headers["Location"] = target
            return response

        async with serve(unused, "127.0.0.1", 0, process_request=redirect) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/p/rtts"
            with pytest.raises(HandshakeError) as caught:
                await collect(url, request(), headers={"X-Auth-Token": "secret-token-1"})
    assert caught.value.status == status
    assert elsewhere_saw == []
