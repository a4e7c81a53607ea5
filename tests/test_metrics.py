"""Gateway metrics: exact values after known sessions, promtool's lint, a real Prometheus."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import generate_latest
from websockets.asyncio.client import connect

from gateway.meter import SessionMeter
from gateway.metrics import GatewayMetrics
from gateway.server import RunningGateway
from tests.fakes import FakeCloud, fail, speak, tone_pcm
from tests.prometheus import require, running_prometheus
from tests.support import exchange, start
from tests.test_gateway import base_of, relay_to, scrape, value

AUDIO = tone_pcm(0.5, 16000)  # 16000 bytes: half a second of 16 kHz PCM


async def known_sessions(cloud: FakeCloud, front: RunningGateway) -> None:
    """Two normal sessions, one ERROR, one cancelled by the client, one refused (403)."""
    cloud.then(
        speak(AUDIO),
        speak(AUDIO),
        fail("ERROR", "SIS.0411", "invalid property"),
        speak(tone_pcm(3, 16000), interval=0.02),
    )
    await exchange(
        front.url("p1"), start("Hello there.", property="english_amy_common", sample_rate="16000")
    )
    await exchange(
        front.url("p1"), start("你好", property="chinese_huaxiaomei_common", sample_rate="16000")
    )
    await exchange(front.url("p1"), start("bad", property="chinese_nobody_common"))
    async with connect(front.url("p1"), proxy=None, compression=None) as ws:
        await ws.send(start("A long text.", property="english_amy_common", sample_rate="16000"))
        await ws.recv()
        await ws.recv()
    with pytest.raises(Exception, match="403"):
        await exchange(front.url("not-allowed"), start("x"))
    await asyncio.wait_for(front.gateway.wait_idle(), 5)


async def test_counters_and_histograms_are_exact_after_known_sessions() -> None:
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url), allowed_project_ids="p1") as front:
        await known_sessions(cloud, front)
        samples = await scrape(front)
    v = lambda name, **labels: value(samples, name, backend="huawei", **labels)  # noqa: E731
    assert v("rtts_sessions_total") == 5
    assert v("rtts_sessions_total", outcome="normal") == 2
    assert (
        v(
            "rtts_sessions_total",
            outcome="normal",
            voice="english_amy_common",
            sample_rate="16000",
            audio_format="pcm",
        )
        == 1
    )
    assert v("rtts_sessions_total", outcome="normal", voice="chinese_huaxiaomei_common") == 1
    assert v("rtts_sessions_total", outcome="error", voice="other") == 1  # not in the catalogue
    assert v("rtts_sessions_total", outcome="client_cancelled") == 1
    assert v("rtts_sessions_total", outcome="rejected", voice="none") == 1
    assert v("rtts_errors_total", outcome="error", code="SIS.0411") == 1
    assert v("rtts_errors_total", outcome="rejected", code="http_403") == 1
    # A hang-up is not an error: it is in rtts_sessions_total only.
    assert v("rtts_errors_total", outcome="client_cancelled") == 0
    assert v("rtts_errors_total") == 2
    assert v("rtts_time_to_start_seconds_count") == 4  # every session that got to START
    assert v("rtts_time_to_first_audio_seconds_count") == 3
    assert v("rtts_time_to_end_seconds_count") == 2
    assert v("rtts_time_to_end_seconds_count", voice="english_amy_common") == 1
    assert v("rtts_real_time_factor_count") == 2
    assert v("rtts_upstream_connect_seconds_count") == 4
    assert v("rtts_session_duration_seconds_count") == 5
    assert v("rtts_text_characters_total", voice="english_amy_common") == len("Hello there.") + len(
        "A long text."
    )
    assert v("rtts_text_characters_total", voice="chinese_huaxiaomei_common") == 2
    normal_audio = 2 * len(AUDIO)
    assert v("rtts_audio_bytes_total", audio_format="pcm", sample_rate="16000") >= normal_audio
    assert v("rtts_audio_seconds_total", voice="chinese_huaxiaomei_common") == pytest.approx(0.5)
    assert v("rtts_active_sessions") == 0 and v("rtts_sessions_limit") == 256
    assert value(samples, "rtts_gateway_build_info", backend="huawei", relay="compiled") == 1


async def test_client_values_never_become_new_series() -> None:
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        for n in range(5):
            await exchange(
                front.url(f"p{n}"),
                start(
                    "x", property=f"voice-{n}", sample_rate=str(1000 + n), audio_format=f"fmt{n}"
                ),
            )
        samples = await scrape(front)
    client_values = (
        {f"p{n}" for n in range(5)}
        | {f"voice-{n}" for n in range(5)}
        | {f"fmt{n}" for n in range(5)}
        | {str(1000 + n) for n in range(5)}
    )
    label_values = {v for (_, ls) in samples for _, v in ls}
    assert not label_values & client_values
    labels = {
        dict(ls).get(k)
        for (name, ls) in samples
        for k in ("voice", "sample_rate", "audio_format")
        if name.startswith("rtts_sessions")
    }
    assert labels == {"other", None}


async def test_exposition_passes_promtool(gateway: RunningGateway) -> None:
    await exchange(gateway.url(), start("Hello.", property="english_amy_common"))
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gateway.metrics_url}/metrics") as response,
    ):
        exposition = await response.read()
    result = await asyncio.to_thread(
        subprocess.run,
        [require("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    ).decode()


async def test_a_real_prometheus_scrapes_the_gateway_and_answers_promql(tmp_path: Path) -> None:
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url), allowed_project_ids="p1") as front:
        await known_sessions(cloud, front)
        target = front.metrics_url.removeprefix("http://")
        async with running_prometheus(tmp_path, [target]) as prometheus:
            assert await prometheus.wait_for('up{job="rtts-gateway"}', 1) == 1
            assert await prometheus.wait_for('sum(rtts_sessions_total{outcome="normal"})', 2) == 2
            assert await prometheus.scalar('sum(rtts_errors_total{code="SIS.0411"})') == 1
            assert (
                await prometheus.scalar('sum(rtts_sessions_total{outcome="client_cancelled"})') == 1
            )
            assert await prometheus.scalar("sum(rtts_time_to_first_audio_seconds_count)") == 3
            assert await prometheus.scalar('rtts_sessions_limit{backend="huawei"}') == 256
            p95 = await prometheus.scalar(
                "histogram_quantile(0.95, sum by (le) (rtts_time_to_first_audio_seconds_bucket))"
            )
            assert p95 is not None and 0 < p95 <= 30


def test_a_remembered_label_child_is_the_registered_one_even_after_a_clear() -> None:
    metrics = GatewayMetrics("huawei", 10)
    sessions = metrics.sessions
    labels = ("huawei", "normal", "none", "16000", "pcm")

    def exposed() -> list[str]:
        text = generate_latest(metrics.registry).decode()
        return [line for line in text.splitlines() if line.startswith("rtts_sessions_total")]

    child = sessions.labels(*labels)
    assert sessions.labels(*labels) is child
    named = sessions.labels(
        backend="huawei", outcome="normal", voice="none", sample_rate="16000", audio_format="pcm"
    )
    assert named is child  # keyword labels reach the same series
    child.inc()
    sessions.labels(*labels).inc(2)
    assert [line.rsplit(" ", 1)[1] for line in exposed()] == ["3.0"]
    sessions.clear()  # a new child must be made (and counted) after this, not the old one
    assert exposed() == []
    sessions.labels(*labels).inc()
    assert [line.rsplit(" ", 1)[1] for line in exposed()] == ["1.0"]
    sessions.remove(*labels)
    assert exposed() == []
    assert sessions.labels(*labels) is not child


async def test_active_sessions_reads_the_sessions_open_at_the_scrape(
    gateway: RunningGateway,
) -> None:
    async with (
        connect(gateway.url(), proxy=None, compression=None) as first,
        connect(gateway.url(), proxy=None, compression=None) as second,
    ):
        assert await scraped_active(gateway) == 2
        await first.close()
        await asyncio.wait_for(until_active(gateway, 1), 5)
        await second.close()
    await asyncio.wait_for(gateway.gateway.wait_idle(), 5)
    assert await scraped_active(gateway) == 0


async def scraped_active(gateway: RunningGateway) -> float:
    return value(await scrape(gateway), "rtts_active_sessions")


async def until_active(gateway: RunningGateway, count: int) -> None:
    while await scraped_active(gateway) != count:  # noqa: ASYNC110 (polling a scrape)
        await asyncio.sleep(0.01)


async def test_what_waits_for_the_first_audio_runs_once_after_it_is_relayed() -> None:
    # The scanner counts an audio frame as it reads it, before the relay writes it: what
    # waits for the first audio (a spare's replacement, the next ClientHello: CPU work) runs
    # a loop turn later, once, so that it never holds up that audio.
    meter = SessionMeter(GatewayMetrics("huawei", 10), "p1")
    counted: list[int] = []
    meter.on_first_audio = lambda: counted.append(meter.audio_bytes)
    meter.upstream_message('{"resp_type": "START", "trace_id": "t1"}')
    meter.upstream_audio(100)
    meter.upstream_audio(50)  # the rest of the same read
    assert counted == [] and meter.first_audio is not None
    await asyncio.sleep(0)
    assert counted == [150]
    meter.upstream_audio(10)
    await asyncio.sleep(0)
    assert counted == [150]
