"""Faults, against the plugin directly and through the gateway, with recognisable secrets.

Each scenario scripts the fake cloud (or takes it away), speaks one utterance with
HuaweiRTTSService, and checks: the bot gets a precise error; every socket on every hop is
closed; no asyncio task is left; the gateway counts exactly one session with the right
outcome and code, and serves the next one; and no secret shows up anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from loguru import logger
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InterruptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
)
from pipecat.tests.utils import SleepFrame, run_test
from websockets.protocol import State

from gateway.server import RunningGateway, run_gateway
from gateway.settings import GatewaySettings
from rtts_plugin import HuaweiRTTSService
from rtts_plugin.config import HuaweiRTTSConnection
from rtts_plugin.errors import RttsError
from tests.fakes import FakeCloud, drip, fail, hang_up, raw, speak, stall, tone_pcm
from tests.test_gateway import scrape, value

TOKEN = "tok-SECRET-4f1c9e"
GATEWAY_KEY = "gwk-SECRET-77aa01"
SECRETS = ("SECRET-4f1c9e", "SECRET-77aa01")
AUDIO = tone_pcm(0.3, 16000)


@dataclass
class Scenario:
    """One fault: how to script the cloud, and what the bot and the gateway must report."""

    name: str
    script: Callable[[FakeCloud], None] = lambda cloud: None
    upstream: str = "fake"  # "fake", "refused" (nothing listens) or "silent" (TCP, no answer)
    direct_error: str | None = None  # fragment of the plugin's error, direct to the cloud
    gateway_error: str | None = None  # the same through the gateway (None: as direct)
    outcome: str = "normal"
    code: str = ""
    frames: list[Frame] = field(default_factory=lambda: [TTSSpeakFrame("Hello there.")])
    audio_bytes: int | None = None


def then(*behaviours: Any) -> Callable[[FakeCloud], None]:
    return lambda cloud: cloud.then(*behaviours)


def refuse(status: int, code: str = "") -> Callable[[FakeCloud], None]:
    return lambda cloud: cloud.refuse_next(status, code, "upstream refused", times=10)


SCENARIOS = [
    Scenario(
        "refused connection",
        upstream="refused",
        direct_error="cannot connect",
        gateway_error="HTTP 502",
        outcome="handshake_failed",
        code="network",
    ),
    Scenario(
        "handshake timeout",
        upstream="silent",
        direct_error="waiting for connect",
        gateway_error="HTTP 504",
        outcome="handshake_failed",
        code="timeout",
    ),
    Scenario(
        "401",
        refuse(401, "APIG.0301"),
        direct_error="HTTP 401 APIG.0301",
        outcome="handshake_failed",
        code="APIG.0301",
    ),
    Scenario(
        "403", refuse(403), direct_error="HTTP 403", outcome="handshake_failed", code="http_403"
    ),
    Scenario(
        "429",
        refuse(429, "APIG.0308"),
        direct_error="HTTP 429 APIG.0308",
        outcome="handshake_failed",
        code="APIG.0308",
    ),
    Scenario(
        "500", refuse(500), direct_error="HTTP 500", outcome="handshake_failed", code="http_500"
    ),
    Scenario(
        "never START", then(stall()), direct_error="waiting for START", outcome="client_cancelled"
    ),
    Scenario(
        "START then silence",
        then(stall(after_start=True)),
        direct_error="waiting for audio",
        outcome="client_cancelled",
    ),
    Scenario(
        "audio then silence",
        then(stall(after_start=True, audio_first=AUDIO[:640])),
        direct_error="waiting for audio",
        outcome="client_cancelled",
    ),
    Scenario(
        "close mid-audio without END",
        then(hang_up(AUDIO[:640])),
        direct_error="closed before END (close code 1000",
        gateway_error="closed before END (close code 1014",
        outcome="upstream_closed",
        code="other",
    ),
    Scenario(
        "FATAL_ERROR mid-audio",
        then(fail("FATAL_ERROR", "SIS.0413", "TTS internal error", audio_first=AUDIO[:640])),
        direct_error="SIS.0413: TTS internal error (trace_id=",
        outcome="fatal",
        code="SIS.0413",
    ),
    Scenario(
        "ERROR before audio",
        then(fail("ERROR", "SIS.0411", "invalid property")),
        direct_error="SIS.0411: invalid property (trace_id=",
        outcome="error",
        code="SIS.0411",
    ),
    Scenario(
        "malformed JSON",
        then(raw('{"resp_type":"START","trace_id":"TRACE"}', "{resp_type: END")),
        direct_error="malformed JSON",
        outcome="error",
        code="protocol",
    ),
    Scenario(
        "unknown resp_type",
        then(
            raw(
                '{"resp_type":"START","trace_id":"TRACE"}',
                '{"resp_type":"PING","trace_id":"TRACE"}',
            )
        ),
        direct_error="closed before END (close code 1000",
        gateway_error="closed before END (close code 1014",
        outcome="upstream_closed",
        code="other",
    ),
    Scenario(
        "binary before START",
        then(raw(b"\x00\x00", '{"resp_type":"START","trace_id":"TRACE"}')),
        direct_error="closed before END (close code 1000",
        gateway_error="closed before END (close code 1014",
        outcome="upstream_closed",
        code="other",
    ),
    Scenario(
        "oversized frame",
        then(raw('{"resp_type":"START","trace_id":"TRACE"}', b"\x00" * (5 * 1024 * 1024))),
        direct_error="larger than the size limit",
        gateway_error="closed before END (close code 1014",
        outcome="upstream_closed",
        code="too_big",
    ),
    Scenario("slow drip", then(drip(150, 0.004)), audio_bytes=150),
    Scenario(
        "client disconnects mid-audio",
        then(speak(tone_pcm(3.0, 16000), interval=0.02)),
        outcome="client_cancelled",
        frames=[
            TTSSpeakFrame("A long answer."),
            SleepFrame(0.4),
            InterruptionFrame(),
            SleepFrame(0.2),
        ],
    ),
]


@contextlib.asynccontextmanager
async def upstream(kind: str) -> AsyncIterator[tuple[str, FakeCloud | None]]:
    """A rtts URL for the scenario's upstream: the fake cloud, a closed port, or a mute one."""
    if kind == "fake":
        cloud = FakeCloud(default=speak(AUDIO))
        async with cloud.running():
            yield cloud.url, cloud
    elif kind == "refused":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/0123456789abcdef/rtts", None
    else:

        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        async with server:
            yield (
                f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/0123456789abcdef/rtts",
                None,
            )


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> AsyncIterator[list[str]]:
    """Everything our components log, at every level (the fake's own websockets logs excluded)."""
    caplog.set_level(logging.DEBUG)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="TRACE")
    yield lines
    logger.remove(sink)
    lines.extend(r.getMessage() for r in caplog.records if not r.name.startswith("websockets."))


def plugin(url: str, via_gateway: bool) -> HuaweiRTTSService:
    credentials = {"gateway_key": GATEWAY_KEY} if via_gateway else {"token": TOKEN}
    return HuaweiRTTSService(
        connection=HuaweiRTTSConnection(
            url=url,
            connect_timeout=0.5,
            start_timeout=0.5,
            gap_timeout=0.5,
            end_timeout=10,
            max_retries=0,
            **credentials,  # type: ignore[arg-type]
        ),
        settings=HuaweiRTTSService.Settings(voice="english_amy_common"),
        sample_rate=16000,
        stop_frame_timeout_s=0.3,
    )


async def settle(check: Callable[[], bool], seconds: float = 3.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


@pytest.mark.parametrize("via_gateway", [False, True], ids=["direct", "gateway"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_fault(scenario: Scenario, via_gateway: bool, captured: list[str]) -> None:
    before = asyncio.all_tasks()
    texts: list[str] = []
    async with upstream(scenario.upstream) as (url, cloud), contextlib.AsyncExitStack() as stack:
        if cloud is not None:
            scenario.script(cloud)
        target = url
        front: RunningGateway | None = None
        if via_gateway:
            settings = GatewaySettings(
                port=0,
                metrics_port=0,
                backend="huawei",
                upstream_url=url.split("/v1/")[0],
                token=TOKEN,
                gateway_key=GATEWAY_KEY,
                upstream_connect_timeout=0.25,
                drain_timeout=1,
            )
            front = await stack.enter_async_context(run_gateway(settings))
            target = front.url("0123456789abcdef")
        tts = plugin(target, via_gateway)
        down, up = await run_test(tts, frames_to_send=scenario.frames)
        errors = [f for f in up if isinstance(f, ErrorFrame) and isinstance(f.exception, RttsError)]
        texts += (
            [e.error for e in errors]
            + [str(e.exception) for e in errors]
            + [repr(tts), repr(tts._connection)]
        )
        expected = (
            scenario.gateway_error if via_gateway and scenario.gateway_error else None
        ) or scenario.direct_error
        if expected is None:
            assert not errors, [e.error for e in errors]
        else:
            assert len(errors) == 1 and expected in errors[0].error, [e.error for e in errors]
        if scenario.audio_bytes is not None:
            assert (
                sum(len(f.audio) for f in down if isinstance(f, TTSAudioRawFrame))
                == scenario.audio_bytes
            )
        if cloud is not None:  # every socket the cloud saw is closed
            assert await settle(lambda: all(ws.state is State.CLOSED for ws in cloud.sockets)), (
                scenario.name
            )
        if front is not None:
            assert await settle(lambda: not front.gateway.active_sessions)
            samples = await scrape(front)
            assert value(samples, "rtts_sessions_total") == 1
            assert value(samples, "rtts_sessions_total", outcome=scenario.outcome) == 1, {
                k: v for k, v in samples.items() if k[0] == "rtts_sessions_total"
            }
            if scenario.outcome == "client_cancelled":  # a hang-up is not an error
                assert value(samples, "rtts_errors_total") == 0
            elif scenario.outcome != "normal":
                assert (
                    value(
                        samples, "rtts_errors_total", outcome=scenario.outcome, code=scenario.code
                    )
                    == 1
                )
            async with aiohttp.ClientSession() as http:
                for page in ("metrics", "readyz", "healthz"):
                    async with http.get(f"{front.metrics_url}/{page}") as response:
                        texts.append(await response.text())
            if cloud is not None:  # and it serves the next session
                cloud.handshakes.clear()
                cloud.behaviours.clear()
                down, up = await run_test(
                    plugin(target, True), frames_to_send=[TTSSpeakFrame("Next caller.")]
                )
                assert not [f for f in up if isinstance(f, ErrorFrame)]
                assert sum(len(f.audio) for f in down if isinstance(f, TTSAudioRawFrame)) == len(
                    AUDIO
                )
    assert await settle(
        lambda: (
            not [
                t
                for t in asyncio.all_tasks() - before
                if not t.done() and t is not asyncio.current_task()
            ]
        )
    ), [t for t in asyncio.all_tasks() - before if not t.done()]
    leaks = [text for text in [*texts, *captured] if any(secret in text for secret in SECRETS)]
    assert not leaks, leaks[:3]


async def test_draining_gateway_closes_a_session_it_cannot_finish_with_going_away(
    captured: list[str],
) -> None:
    cloud = FakeCloud(default=speak(tone_pcm(5.0, 16000), interval=0.02))
    async with cloud.running():
        settings = GatewaySettings(
            port=0,
            metrics_port=0,
            backend="huawei",
            upstream_url=cloud.url.split("/v1/")[0],
            token=TOKEN,
            drain_timeout=0.3,
        )
        running = run_gateway(settings)
        front = await running.__aenter__()
        tts = plugin(front.url("p"), via_gateway=False)

        async def sigterm_soon() -> None:
            await asyncio.sleep(0.5)
            await running.__aexit__(None, None, None)  # what SIGTERM does in rtts-gateway

        stopper = asyncio.create_task(sigterm_soon())
        _, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("A long answer.")])
        await stopper
        counted = front.gateway.metrics.errors.labels("huawei", "timeout", "draining")._value.get()
    assert counted == 1
    errors = [
        f.error for f in up if isinstance(f, ErrorFrame) and isinstance(f.exception, RttsError)
    ]
    assert (
        len(errors) == 1 and "close code 1001" in errors[0] and "gateway shutting down" in errors[0]
    )
    assert all(ws.state is State.CLOSED for ws in cloud.sockets)
    assert not [line for line in captured if any(secret in line for secret in SECRETS)]


def test_scenarios_cover_the_list_in_the_reliability_issue() -> None:
    names = {s.name for s in SCENARIOS}
    assert len(names) == len(SCENARIOS) >= 18
    assert json.dumps(sorted(names))
