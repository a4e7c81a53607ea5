"""Failover with pipecat's ServiceSwitcher: two HuaweiRTTSService endpoints, and the local engine.

The primary dies mid-call; the next utterance is spoken by the backup; the primary's
handshake-only probe brings it back and raises ``on_recovered``. Real pipelines, real
servers on loopback (scripted fakes of two cloud regions, the real local engine).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from pipecat.frames.frames import ErrorFrame, ManuallySwitchServiceFrame, TTSSpeakFrame
from pipecat.pipeline.service_switcher import ServiceSwitcher, ServiceSwitcherStrategyFailover
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.utils.errors import ErrorCategory

from gateway.server import RunningGateway, run_gateway
from gateway.settings import GatewaySettings
from rtts_plugin import HuaweiRTTSService
from tests.fakes import FakeCloud, json_response, speak, tone_pcm
from tests.test_resilience import make, scaled, utterances

ROOT = Path(__file__).resolve().parents[1]
REGION_A = tone_pcm(0.3, 16000, hz=220.0)
REGION_B = tone_pcm(0.3, 16000, hz=330.0)


def member(url: str, name: str) -> HuaweiRTTSService:
    return make(url, name=name, **scaled(max_retries=0, max_consecutive_failures=1))


def watch_switches(switcher: ServiceSwitcher[ServiceSwitcherStrategyFailover]) -> list[str]:
    switched: list[str] = []

    @switcher.strategy.event_handler("on_service_switched")
    async def on_switched(_: object, service: FrameProcessor) -> None:
        switched.append(service.name)

    return switched


def watch_errors(*services: HuaweiRTTSService) -> list[tuple[str, ErrorFrame]]:
    errors: list[tuple[str, ErrorFrame]] = []
    for service in services:

        @service.event_handler("on_error")
        async def on_error(failed: HuaweiRTTSService, error: ErrorFrame) -> None:
            errors.append((failed.name, error))

    return errors


async def test_primary_dies_the_backup_speaks_the_primary_comes_back() -> None:
    region_a, region_b = FakeCloud(default=speak(REGION_A)), FakeCloud(default=speak(REGION_B))
    # Region A: the first utterance, then down for the next handshake and two probes.
    region_a.handshakes.extend([None, *[json_response(503, "", "region down")] * 3])
    async with region_a.running(), region_b.running():
        primary, backup = member(region_a.url, "region-a"), member(region_b.url, "region-b")
        recovered: list[float] = []

        @primary.event_handler("on_recovered")
        async def on_recovered(_: object, outage: float) -> None:
            recovered.append(outage)

        switcher = ServiceSwitcher(
            services=[primary, backup], strategy_type=ServiceSwitcherStrategyFailover
        )
        switched, errors = watch_switches(switcher), watch_errors(primary, backup)
        down, up = await run_test(
            switcher,
            frames_to_send=[
                TTSSpeakFrame("Region A speaks."),
                SleepFrame(0.5),  # the failure is handled before the next frame is routed
                TTSSpeakFrame("In flight when A died."),
                SleepFrame(0.5),  # the failure is handled before the next frame is routed
                TTSSpeakFrame("Region B carries on."),
                SleepFrame(1.5),  # A's probe: two refusals, then an answer
                ManuallySwitchServiceFrame(service=primary),
                TTSSpeakFrame("Region A is back."),
            ],
        )
    assert utterances(list(down)) == [REGION_A, b"", REGION_B, REGION_A]
    assert switched == ["region-b", "region-a"]
    ((name, error),) = errors
    assert (
        name == "region-a" and error.category is ErrorCategory.SERVER and "HTTP 503" in error.error
    )
    assert not [f for f in up if isinstance(f, ErrorFrame)]  # the switcher absorbed it
    assert len(recovered) == 1 and primary.is_usable and backup.is_usable
    spoken_a = [c.start["text"] for c in region_a.connections if c.start]  # type: ignore[index]
    spoken_b = [c.start["text"] for c in region_b.connections if c.start]  # type: ignore[index]
    assert spoken_a == ["Region A speaks.", "Region A is back."]
    assert spoken_b == ["Region B carries on."]
    assert len(region_a.requests) == 6  # 2 utterances, 1 refused attempt, 3 probes
    assert sum(1 for c in region_a.connections if c.start is None) == 1  # the answered probe


async def test_gateway_first_then_direct() -> None:
    upstream, direct = FakeCloud(default=speak(REGION_A)), FakeCloud(default=speak(REGION_B))
    # Behind the gateway the cloud answers the first session, then is down for two handshakes.
    upstream.handshakes.extend([None, *[json_response(503, "", "region down")] * 2])
    async with upstream.running(), direct.running():
        settings = GatewaySettings(
            port=0,
            metrics_port=0,
            backend="huawei",
            upstream_url=upstream.url.split("/v1/")[0],
            token="tok-gateway",
            drain_timeout=1,
        )
        async with run_gateway(settings) as front:
            via_gateway = member(front.url("0123456789abcdef"), "gateway")
            straight = member(direct.url, "direct")
            recovered: list[float] = []

            @via_gateway.event_handler("on_recovered")
            async def on_recovered(_: object, outage: float) -> None:
                recovered.append(outage)

            switcher = ServiceSwitcher(
                services=[via_gateway, straight], strategy_type=ServiceSwitcherStrategyFailover
            )
            switched, errors = watch_switches(switcher), watch_errors(via_gateway, straight)
            down, _ = await run_test(
                switcher,
                frames_to_send=[
                    TTSSpeakFrame("Through the gateway."),
                    SleepFrame(0.5),  # the failure is handled before the next frame is routed
                    TTSSpeakFrame("Lost: the region behind it is down."),
                    SleepFrame(0.5),  # the failure is handled before the next frame is routed
                    TTSSpeakFrame("Straight to the cloud."),
                    SleepFrame(1.5),  # the probe goes through the gateway to the region
                    ManuallySwitchServiceFrame(service=via_gateway),
                    TTSSpeakFrame("Through the gateway again."),
                ],
            )
    assert utterances(list(down)) == [REGION_A, b"", REGION_B, REGION_A]
    assert switched == ["direct", "gateway"]
    ((name, error),) = errors
    assert name == "gateway" and "HTTP 503" in error.error
    assert len(recovered) == 1 and via_gateway.is_usable
    # The gateway's upstream saw the probe as a handshake without START: nothing billed.
    assert [c.start["text"] for c in upstream.connections if c.start] == [  # type: ignore[index]
        "Through the gateway.",
        "Through the gateway again.",
    ]


async def test_the_local_engine_is_the_last_resort(gateway: RunningGateway) -> None:
    region_a, region_b = FakeCloud(default=speak(REGION_A)), FakeCloud(default=speak(REGION_B))
    region_a.refuse_next(503, "", "down", times=100)
    region_b.refuse_next(401, "APIG.0301", "token expires", times=100)  # permanent
    async with region_a.running(), region_b.running():
        primary, backup = member(region_a.url, "region-a"), member(region_b.url, "region-b")
        local = HuaweiRTTSService(
            url=gateway.url("last-resort"),
            settings=HuaweiRTTSService.Settings(voice="english_amy_common"),
            sample_rate=16000,
            name="local-engine",
        )
        switcher = ServiceSwitcher(
            services=[primary, backup, local], strategy_type=ServiceSwitcherStrategyFailover
        )
        switched, errors = watch_switches(switcher), watch_errors(primary, backup, local)
        down, _ = await run_test(
            switcher,
            frames_to_send=[
                TTSSpeakFrame("Lost on A."),
                SleepFrame(0.5),  # the failure is handled before the next frame is routed
                TTSSpeakFrame("Lost on B."),
                SleepFrame(0.5),  # the failure is handled before the next frame is routed
                TTSSpeakFrame("The local engine speaks."),
            ],
        )
    assert switched == ["region-b", "local-engine"]
    assert [(name, e.category) for name, e in errors] == [
        ("region-a", ErrorCategory.SERVER),
        ("region-b", ErrorCategory.AUTHENTICATION),
    ]
    spoken = utterances(list(down))
    assert spoken[:2] == [b"", b""] and len(spoken[2]) > 16000
    (record,) = [r for r in gateway.engine.history if r.request]  # type: ignore[union-attr]
    assert record.request.text == "The local engine speaks."  # type: ignore[union-attr]
    assert not primary.is_usable and not backup.is_usable and local.is_usable
    assert primary._probe_task is None  # stopped with the pipeline
    assert backup._probe_task is None  # a permanent failure is never probed


def test_failover_example_runs_as_documented() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "failover.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines == [
        "'Hello, you are talking to the primary.': spoken",
        "-- the primary goes down",
        "now speaking: tts-2",
        "'This sentence was in flight when it died.': lost (an ErrorFrame)",
        "'The backup carries on.': spoken",
        "-- the backup goes down too",
        "now speaking: tts-3",
        "'Another sentence in flight.': lost (an ErrorFrame)",
        "'The local engine is the last resort.': spoken",
        "-- the primary is back",
        lines[10],
        "now speaking: tts-1",
        "'The primary speaks again.': spoken",
    ]
    assert lines[10].startswith("tts-1 recovered after ")


async def test_failover_example_over_given_urls(gateway: RunningGateway) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "failover.py"),
        "--url",
        gateway.url("p"),
        "--local-last-resort",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert stdout.decode().count(": spoken") == 3
    assert len([r for r in gateway.engine.history if r.request]) == 3  # type: ignore[union-attr]
