"""Huawei's own demo client (websocket-client, threads) against the local engine."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from gateway.server import RunningGateway
from tests.clients.seed_demo_client import rtts_demo

# Huawei's API page as captured, kept in the repository with its provenance (tests/data/).
DATA = Path(__file__).resolve().parent / "data"
PAGE = DATA / "rtts-api-page.txt"


def test_the_api_page_is_the_recorded_capture() -> None:
    digest = hashlib.sha256(PAGE.read_bytes()).hexdigest()
    assert f"SHA-256: `{digest}`" in (DATA / "README.md").read_text(encoding="utf-8")


def test_our_copy_follows_the_published_demo() -> None:
    page = PAGE.read_text(encoding="utf-8")
    for line in (
        "ws = websocket.WebSocketApp(url, header, on_message=_on_message, on_error=_on_error)",
        "_thread = threading.Thread(target=ws.run_forever, args=(None, None, 30, 20))",
        "ws.send(json.dumps(body), opcode=websocket.ABNF.OPCODE_TEXT)",
        "header = { 'X-Auth-Token': token }",
    ):
        assert line in page


async def test_demo_client_receives_start_audio_and_end(gateway: RunningGateway) -> None:
    received: list[str | bytes] = []
    config = {"audio_format": "pcm", "property": "chinese_xiaoyu_common", "sample_rate": "8000"}
    await asyncio.to_thread(
        rtts_demo, gateway.url("0123456789abcdef"), "Text to be synthesized", config, received
    )
    texts = [json.loads(m) for m in received if isinstance(m, str)]
    assert [t["resp_type"] for t in texts] == ["START", "END"]
    assert texts[1]["reason"] == "NORMAL"
    audio = b"".join(m for m in received if isinstance(m, bytes))
    assert len(audio) > 8000  # more than half a second of 8 kHz 16-bit speech
    first_audio = next(i for i, m in enumerate(received) if isinstance(m, bytes))
    assert isinstance(received[0], str) and first_audio == 1
    assert isinstance(received[-1], str)
