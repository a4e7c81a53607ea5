"""A small traffic generator for the monitored stack and smoke tests.

Speaks a mix of texts, voices, formats and rates through a gateway, with a few bad requests
(unknown voice, text over the limit, malformed JSON) and a few callers who hang up early,
so every panel of the dashboard has something to show.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException

logger = logging.getLogger(__name__)

_TEXTS = (
    ("english_amy_common", "Thank you for calling. How can I help you today?"),
    ("english_alvin_common", "Your order has shipped and will arrive on Tuesday."),
    ("chinese_huaxiaomei_common", "您好，欢迎致电客服中心，请问有什么可以帮您？"),
    ("chinese_xiaoyan_common", "您的账户余额为一百二十元。"),
    ("chinese_xiaoyu_common", "请按一号键查询订单，按二号键转人工服务。"),
)
_FORMATS = (("pcm", "16000"), ("pcm", "8000"), ("ulaw", "8000"), ("alaw", "8000"), ("mp3", "16000"))


@dataclass(frozen=True, slots=True)
class Call:
    """One scripted request: the raw START frame, and whether the caller hangs up early."""

    payload: str
    hang_up: bool = False


# One call in this many is a bad request, so the error panels and alerts have something to show.
BAD_EVERY: Final = 8


def calls(seed: int = 7) -> Iterator[Call]:
    """An endless, reproducible mix: mostly good requests, one in eight bad, some hang-ups."""
    chooser = random.Random(seed)  # noqa: S311 (a traffic mix, not crypto)
    for n in itertools.count():
        if n % BAD_EVERY == BAD_EVERY - 1:
            yield Call(
                chooser.choice(
                    [
                        json.dumps(
                            {"command": "START", "text": "hi", "config": {"property": "nobody"}}
                        ),
                        json.dumps({"command": "START", "text": "x" * 501, "config": {}}),
                        "{not json",
                    ]
                )
            )
            continue
        voice, text = chooser.choice(_TEXTS)
        audio_format, rate = chooser.choice(_FORMATS)
        if voice == "chinese_huaxiaomei_common":
            audio_format = "pcm"  # a pcm-only voice
        config = {"property": voice, "audio_format": audio_format, "sample_rate": rate}
        if voice == "chinese_huaxiaomei_common" and n % 2:
            config["subtitle"] = "word_level"
        yield Call(
            json.dumps({"command": "START", "text": text, "config": config}), hang_up=n % 13 == 5
        )


async def place(url: str, call: Call) -> str:
    """Make one call; returns how it ended (``END``, ``ERROR``, ``hung_up`` or ``failed``)."""
    try:
        async with connect(url, compression=None, proxy=None, max_size=None) as ws:
            await ws.send(call.payload)
            async for message in ws:
                if call.hang_up and isinstance(message, bytes):
                    return "hung_up"
                if isinstance(message, str):
                    kind = json.loads(message).get("resp_type")
                    if kind in ("END", "ERROR", "FATAL_ERROR"):
                        return str(kind)
    except (OSError, WebSocketException, ConnectionClosed) as exc:
        logger.warning("call failed: %s", exc)
    return "failed"


async def generate(
    url: str, *, total: int | None = None, concurrency: int = 4, pause: float = 0.2
) -> Counter[str]:
    """Place ``total`` calls (forever if ``None``), ``concurrency`` at a time; count outcomes."""
    outcomes: Counter[str] = Counter()
    script = calls()
    budget = itertools.count() if total is None else iter(range(total))
    lock = asyncio.Lock()

    async def caller() -> None:
        while True:
            async with lock:
                if next(budget, None) is None:
                    return
                call = next(script)
            outcomes[await place(url, call)] += 1
            await asyncio.sleep(pause)

    workers = [asyncio.create_task(caller()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*workers)
    finally:
        for worker in workers:
            worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*workers, return_exceptions=True)
    return outcomes
