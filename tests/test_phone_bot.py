"""examples/phone_bot.py, with the test playing the telephony provider (Twilio Media Streams)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import aiohttp
import numpy as np
from websockets.asyncio.client import connect

from gateway.server import RunningGateway

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ROOT = Path(__file__).resolve().parents[1]
STREAM_SID = "MZ00000000000000000000000000000000"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Provider:
    """The provider's side of one call: audio per prompt, split at the bot's marks."""

    def __init__(self) -> None:
        self.current = bytearray()
        self.prompts: dict[str, bytes] = {}
        self.events: list[str] = []

    def take(self, message: dict[str, object]) -> str | None:
        event = str(message["event"])
        assert message.get("streamSid") == STREAM_SID
        if event == "media":
            self.current += base64.b64decode(message["media"]["payload"])  # type: ignore[index]
        elif event == "mark":
            name = str(message["mark"]["name"])  # type: ignore[index]
            self.prompts[name], self.current = bytes(self.current), bytearray()
            self.events.append(f"mark:{name}")
            return name
        elif event == "clear":
            self.events.append("clear")
            self.prompts["(cleared)"], self.current = bytes(self.current), bytearray()
            return "clear"
        return None


def speech_seconds(mulaw: bytes) -> tuple[float, float]:
    """Duration and RMS (0..1) of 8 kHz mu-law audio."""
    pcm = np.frombuffer(audioop.ulaw2lin(mulaw, 2), dtype="<i2") / 32768.0
    return len(pcm) / 8000, float(np.sqrt(np.mean(pcm**2))) if len(pcm) else 0.0


@contextlib.asynccontextmanager
async def phone_bot_server(tts_url: str) -> AsyncIterator[tuple[ModuleType, int]]:
    """examples/phone_bot.py serving on a free port, speaking through ``tts_url``."""
    phone_bot = load_example("phone_bot")
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_ready(port: int) -> None:
        ready.set_result(port)

    server = asyncio.create_task(phone_bot.serve("127.0.0.1", 0, tts_url, ready=on_ready))
    try:
        yield phone_bot, await asyncio.wait_for(ready, 20)
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


async def test_phone_bot_greets_reads_the_menu_and_stops_it_on_barge_in(
    gateway: RunningGateway,
) -> None:
    provider = Provider()
    async with phone_bot_server(gateway.url("phone")) as (phone_bot, port):
        async with connect(f"ws://127.0.0.1:{port}/ws", proxy=None) as ws:
            await ws.send(
                json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            )
            await ws.send(
                json.dumps(
                    {
                        "event": "start",
                        "sequenceNumber": "1",
                        "streamSid": STREAM_SID,
                        "start": {
                            "streamSid": STREAM_SID,
                            "accountSid": "AC0",
                            "callSid": "CA0",
                            "tracks": ["inbound"],
                            "mediaFormat": {
                                "encoding": "audio/x-mulaw",
                                "sampleRate": 8000,
                                "channels": 1,
                            },
                        },
                    }
                )
            )
            async with asyncio.timeout(40):
                while provider.take(json.loads(await ws.recv())) != "greeting":
                    pass
                # Let some of the menu play, then press 1: the bot must stop the menu.
                while len(provider.current) < 8000 * 0.4:
                    provider.take(json.loads(await ws.recv()))
                await ws.send(
                    json.dumps(
                        {
                            "event": "dtmf",
                            "streamSid": STREAM_SID,
                            "sequenceNumber": "9",
                            "dtmf": {"track": "inbound_track", "digit": "1"},
                        }
                    )
                )
                while provider.take(json.loads(await ws.recv())) != "1":
                    pass

    assert provider.events == ["mark:greeting", "clear", "mark:1"], (
        provider.events
    )  # no "menu" mark: it was cut
    greeting_s, greeting_rms = speech_seconds(provider.prompts["greeting"])
    answer_s, answer_rms = speech_seconds(provider.prompts["1"])
    menu_s, _ = speech_seconds(provider.prompts["(cleared)"])
    assert 1.0 < greeting_s < 6 and greeting_rms > 0.02  # "Thank you for calling Example Telecom."
    assert 1.5 < answer_s < 8 and answer_rms > 0.02  # "Billing. Your balance is ..."
    assert 0.4 <= menu_s < 3.0  # the menu (about 7 s long) stopped soon after the key press
    spoken = [r.request.text for r in gateway.engine.history if r.request] if gateway.engine else []
    assert spoken == [
        phone_bot.PROMPTS["greeting"],
        phone_bot.PROMPTS["menu"],
        phone_bot.PROMPTS["1"],
    ]
    assert all(r.request.config.sample_rate == "8000" for r in gateway.engine.history if r.request)  # type: ignore[union-attr]


async def test_twiml_points_the_provider_at_the_stream(gateway: RunningGateway) -> None:
    async with phone_bot_server(gateway.url()) as (_, port), aiohttp.ClientSession() as http:
        async with http.post(
            f"http://127.0.0.1:{port}/", headers={"Host": "bot.example"}
        ) as response:
            assert response.status == 200
            assert '<Stream url="wss://bot.example/ws"/>' in await response.text()
