"""The gateway as a relay: fidelity, handshake outcomes, closes, limits, health, drain, logs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.server import RunningGateway, run_gateway
from gateway.settings import GatewaySettings
from tests.fakes import FakeCloud, speak, stall, tone_pcm
from tests.support import exchange, start

SENTENCE = "The quick brown fox jumps over the lazy dog."


@asynccontextmanager
async def relay_to(upstream_base: str, **settings: Any) -> AsyncIterator[RunningGateway]:
    """A gateway on the huawei backend whose upstream is ``upstream_base``."""
    options = {
        "port": 0,
        "metrics_port": 0,
        "backend": "huawei",
        "upstream_url": upstream_base,
        "token": "tok-Upstream-1",
        **settings,
    }
    async with run_gateway(GatewaySettings(**options)) as running:
        yield running


def base_of(url: str) -> str:
    return url.split("/v1/", 1)[0]


async def scrape(gateway: RunningGateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gateway.metrics_url}/metrics") as response,
    ):
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


# -- relay fidelity --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"audio_format": "pcm", "sample_rate": "16000", "property": "english_amy_common"},
        {
            "audio_format": "pcm",
            "sample_rate": "8000",
            "property": "chinese_huaxiaomei_common",
            "subtitle": "phoneme_level",
        },
        {"audio_format": "ulaw", "sample_rate": "8000", "property": "chinese_xiaoyu_common"},
        {"audio_format": "alaw", "sample_rate": "16000", "property": "english_alvin_common"},
        {"audio_format": "mp3", "sample_rate": "16000", "property": "chinese_xiaoqi_common"},
    ],
)
async def test_chained_gateways_deliver_exactly_what_the_engine_sent(
    gateway: RunningGateway, config: dict[str, str]
) -> None:
    assert gateway.engine is not None
    async with relay_to(base_of(gateway.url())) as front:
        seen = await exchange(front.url("project-7"), start(SENTENCE, **config))
    record = gateway.engine.history[-1]
    assert record.outcome == "normal"
    assert (
        hashlib.sha256(seen.audio).hexdigest() == record.audio_sha256
        and len(seen.audio) == record.audio_bytes
    )
    assert seen.kinds[0] == "START" and seen.kinds[-1] == "END" and seen.close_code == 1000
    assert {m["trace_id"] for m in seen.messages} == {record.trace_id}  # the engine's own messages
    if "subtitle" in config:
        # every word has its phonemes; the empty closing item of a sentence has none
        assert seen.words() and all(w["phonemes"] or not w["text"] for w in seen.words())


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (start("x", property="nobody"), "SIS.0411"),
        ("{oops", "SIS.0032"),
        (b"\x00", "SIS.0032"),
        (start(""), "SIS.0415"),
    ],
)
async def test_error_replies_pass_through_unchanged(
    gateway: RunningGateway, payload: str | bytes, code: str
) -> None:
    direct = await exchange(gateway.url(), payload)
    async with relay_to(base_of(gateway.url())) as front:
        relayed = await exchange(front.url(), payload)
    assert relayed.kinds == direct.kinds == ["ERROR"]
    strip = lambda m: {k: v for k, v in m.items() if k != "trace_id"}  # noqa: E731
    assert [strip(m) for m in relayed.messages] == [strip(m) for m in direct.messages]
    assert (
        relayed.messages[0]["error_code"] == code
        and relayed.close_code == direct.close_code == 1000
    )


async def test_upstream_is_authenticated_by_the_gateway_not_the_client() -> None:
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url), enterprise_project_id="ep-1") as front:
        client_headers = {"X-Auth-Token": "client-token"}
        await exchange(front.url("abc"), start("hi"), headers=client_headers)
    request = cloud.requests[0]
    assert (
        request.headers["X-Auth-Token"] == "tok-Upstream-1"
        and request.headers["Enterprise-Project-Id"] == "ep-1"
    )
    assert request.path == "/v1/abc/rtts"  # the host and credentials come from configuration only


# -- handshake fidelity ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"), [(401, "APIG.0301"), (403, ""), (429, "APIG.0308"), (500, ""), (503, "")]
)
async def test_upstream_handshake_status_reaches_the_client(status: int, code: str) -> None:
    cloud = FakeCloud()
    cloud.refuse_next(status, code, "upstream says no")
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        with pytest.raises(InvalidStatus) as caught:
            await exchange(front.url(), start("hi"))
        samples = await scrape(front)
    response = caught.value.response
    assert response.status_code == status
    body = json.loads(response.body)
    assert body["error_code"] == code and "upstream says no" in body["error_msg"]
    label = code or f"http_{status}"
    assert value(samples, "rtts_errors_total", outcome="handshake_failed", code=label) == 1


async def test_unreachable_upstream_is_502_and_a_silent_one_504() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    async with relay_to(f"ws://127.0.0.1:{closed_port}") as front:
        with pytest.raises(InvalidStatus) as refused:
            await exchange(front.url(), start("hi"))
    assert refused.value.response.status_code == 502
    assert "unreachable" in json.loads(refused.value.response.body)["error_msg"]

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept the TCP connection, never answer the upgrade
        writer.close()

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, relay_to(f"ws://127.0.0.1:{port}", upstream_connect_timeout=0.3) as front:
        with pytest.raises(InvalidStatus) as silent:
            await exchange(front.url(), start("hi"))
        samples = await scrape(front)
    assert silent.value.response.status_code == 504
    assert value(samples, "rtts_errors_total", outcome="handshake_failed", code="timeout") == 1


# -- closes -----------------------------------------------------------------------------------


async def test_client_leaving_mid_stream_closes_the_upstream() -> None:
    cloud = FakeCloud(default=speak(tone_pcm(3.0, 16000), interval=0.02))
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        async with connect(front.url(), proxy=None, compression=None) as ws:
            await ws.send(start("long"))
            await ws.recv()
            await ws.recv()
        await asyncio.wait_for(front.gateway.wait_idle(), 5)
        for _ in range(100):
            if cloud.connections[0].client_closed_early:
                break
            await asyncio.sleep(0.02)
        samples = await scrape(front)
    (log,) = cloud.connections
    assert log.client_closed_early and log.frames_sent < log.frames_planned
    assert value(samples, "rtts_sessions_total", outcome="client_cancelled") == 1


async def test_upstream_closing_mid_stream_closes_the_client_with_an_error() -> None:
    from tests.fakes import hang_up

    cloud = FakeCloud(default=hang_up())
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        seen = await exchange(front.url(), start("hi"))
        await asyncio.wait_for(front.gateway.wait_idle(), 5)
        samples = await scrape(front)
    assert seen.kinds == ["START", "AUDIO"]
    assert seen.close_code == 1014  # bad gateway: the session did not end with END
    assert value(samples, "rtts_sessions_total", outcome="upstream_closed") == 1


async def test_silent_upstream_is_cut_after_the_gap_timeout() -> None:
    cloud = FakeCloud(default=stall(after_start=True, audio_first=b"\x00\x00"))
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_gap_timeout=0.3) as front:
        seen = await exchange(front.url(), start("hi"))
        await asyncio.wait_for(front.gateway.wait_idle(), 5)
        samples = await scrape(front)
    assert seen.close_code == 1014 and seen.kinds == ["START", "AUDIO"]
    assert value(samples, "rtts_errors_total", outcome="timeout", code="timeout") == 1
    assert cloud.connections[0].client_closed_early


async def test_sessions_longer_than_the_limit_are_closed() -> None:
    cloud = FakeCloud(default=speak(tone_pcm(5.0, 16000), interval=0.02))
    async with cloud.running(), relay_to(base_of(cloud.url), max_session_seconds=0.4) as front:
        seen = await exchange(front.url(), start("hi"))
    assert seen.close_code == 1014 and "END" not in seen.kinds


# -- admission ---------------------------------------------------------------------------------


@pytest.mark.parametrize("configured", ["k-Secret-9", "k-Secret-9\n"], ids=["plain", "from-a-file"])
async def test_gateway_key_missing_or_wrong_is_401_right_is_served(
    gateway: RunningGateway, configured: str
) -> None:
    # A key read from a file keeps its newline; a header cannot carry it, so it is dropped.
    async with relay_to(base_of(gateway.url()), gateway_key=configured) as front:
        for header, expected in (
            ({}, 401),
            ({"Authorization": "Bearer wrong"}, 401),
            ({"Authorization": "Bearer k-Secret-9"}, 101),
        ):
            try:
                async with connect(front.url(), additional_headers=header, proxy=None) as ws:
                    await ws.send(start("hi"))
                    assert json.loads(await ws.recv())["resp_type"] == "START"
                    status = 101
            except InvalidStatus as exc:
                status = exc.response.status_code
            assert status == expected


async def test_only_allowed_projects_are_served(gateway: RunningGateway) -> None:
    async with relay_to(base_of(gateway.url()), allowed_project_ids="alpha, beta") as front:
        with pytest.raises(InvalidStatus) as caught:
            await exchange(front.url("gamma"), start("hi"))
        assert caught.value.response.status_code == 403
        assert (await exchange(front.url("beta"), start("hi"))).kinds == ["START", "AUDIO", "END"]


# -- health, drain, logs -------------------------------------------------------------------------


async def test_health_and_readiness_report_the_backend(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.metrics_url}/healthz") as response:
            assert response.status == 200 and (await response.json())["backend"] == "local"
        async with http.get(f"{gateway.metrics_url}/readyz") as response:
            assert response.status == 200 and (await response.json())["ready"] is True
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        async with (
            relay_to(f"ws://127.0.0.1:{closed_port}") as front,
            http.get(f"{front.metrics_url}/readyz") as response,
        ):
            # Still ready: the cloud's state is not the pod's (tests/test_readiness.py).
            body = await response.json()
            assert (
                response.status == 200
                and body["backend"] == "huawei"
                and "unreachable" in body["detail"]
            )


async def test_drain_lets_sessions_finish_then_closes_the_rest_going_away() -> None:
    cloud = FakeCloud(default=speak(tone_pcm(5.0, 16000), interval=0.02))
    async with cloud.running():
        async with relay_to(base_of(cloud.url), drain_timeout=0.3) as front:
            ws = await connect(front.url(), proxy=None, compression=None)
            await ws.send(start("long"))
            await ws.recv()
        with pytest.raises(ConnectionClosed) as caught:
            while True:
                await ws.recv()
    assert caught.value.rcvd is not None and caught.value.rcvd.code == 1001


async def test_one_json_log_line_per_session_without_secrets(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with relay_to(base_of(gateway.url())) as front:
        await exchange(
            front.url("proj-1"), start(SENTENCE, property="english_amy_common", sample_rate="16000")
        )
        await exchange(front.url("proj-1"), start("x", property="nobody"))
        await asyncio.wait_for(front.gateway.wait_idle(), 5)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.sessions"]
    front_lines = [line for line in lines if line["backend"] == "huawei"]
    assert [line["outcome"] for line in front_lines] == ["normal", "error"]
    first = front_lines[0]
    assert (
        first["project_id"] == "proj-1"
        and first["voice"] == "english_amy_common"
        and first["trace_id"]
    )
    assert first["audio_seconds"] > 1 and first["time_to_first_audio_s"] is not None
    assert front_lines[1]["code"] == "SIS.0411"
    assert not [r for r in caplog.records if "tok-Upstream-1" in r.getMessage()]


async def test_the_plugin_speaks_through_a_keyed_gateway(gateway: RunningGateway) -> None:
    from pipecat.frames.frames import TTSAudioRawFrame, TTSSpeakFrame
    from pipecat.tests.utils import run_test

    from rtts_plugin import HuaweiRTTSService
    from rtts_plugin.config import HuaweiRTTSConnection

    async with relay_to(base_of(gateway.url()), gateway_key="k-Secret-9") as front:
        tts = HuaweiRTTSService(
            connection=HuaweiRTTSConnection(url=front.url("bot"), gateway_key="k-Secret-9"),
            settings=HuaweiRTTSService.Settings(voice="english_amy_common"),
            sample_rate=16000,
        )
        down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Through the gateway.")])
    audio = b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame))
    assert not up
    assert gateway.engine is not None
    assert hashlib.sha256(audio).hexdigest() == gateway.engine.history[-1].audio_sha256


async def test_no_permessage_deflate_on_either_hop(gateway: RunningGateway) -> None:
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        async with connect(
            front.url(), proxy=None, compression="deflate"
        ) as ws:  # the client offers it
            assert ws.protocol.extensions == []  # the gateway declines
            await ws.send(start("hi"))
            async for _ in ws:
                pass
    assert (
        "Sec-WebSocket-Extensions" not in cloud.requests[0].headers
    )  # and never offers it upstream
