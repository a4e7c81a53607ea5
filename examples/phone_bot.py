"""A phone bot at 8 kHz mu-law, connected the way telephony providers connect.

Twilio-style Media Streams: the provider opens a WebSocket to ``/ws``, sends ``connected``
and ``start``, then base64 mu-law ``media`` (and ``dtmf``) events; the bot answers with
``media``, ``mark`` and ``clear`` events. pipecat's Twilio serializer and FastAPI WebSocket
transport do the wire work; ``HuaweiRTTSService`` speaks through the gateway.

    python examples/phone_bot.py                    # local engine, listens on 127.0.0.1:8080
    python examples/phone_bot.py --tts-url ws://127.0.0.1:8765/v1/my-project/rtts

Point a Twilio number's voice webhook at ``POST /`` (it answers with TwiML that opens the
stream to ``wss://<your host>/ws``). The conversation is a scripted menu, so no LLM or STT
account is needed: press 1 or 2 at any time (DTMF barge-in) and the bot stops the prompt
it is speaking and answers. In a real bot, an STT service and an LLM go where the comments
in :func:`build_pipeline` say.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from loguru import logger
from pipecat.frames.frames import (
    Frame,
    InputDTMFFrame,
    OutputTransportMessageFrame,
    TTSSpeakFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner

from gateway.server import url_or_local_engine
from rtts_plugin import HuaweiRTTSService

PHONE_RATE = 8000
PROMPTS = {
    "greeting": "Thank you for calling Example Telecom.",
    "menu": (
        "For billing, press one. For technical support, press two. "
        "To hear this again, stay on the line."
    ),
    "1": "Billing. Your balance is twelve dollars, due on Friday.",
    "2": "Technical support. Please restart your router, then call us back.",
}


class PhoneMenu(FrameProcessor):
    """The scripted conversation: greeting, menu, and an answer for each key.

    Each prompt is followed by a Media Streams ``mark`` named after it, which the provider
    echoes once the audio before it has played. A key press interrupts what is playing.
    """

    def __init__(self, stream_sid: str) -> None:
        super().__init__()
        self._stream_sid = stream_sid

    async def begin(self) -> None:
        """Greet the caller and read the menu."""
        await self.say("greeting")
        await self.say("menu")

    async def say(self, prompt: str) -> None:
        """Speak one prompt, then mark its end."""
        await self.push_frame(TTSSpeakFrame(PROMPTS[prompt]))
        mark = {"event": "mark", "streamSid": self._stream_sid, "mark": {"name": prompt}}
        await self.push_frame(OutputTransportMessageFrame(message=mark))

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Answer key presses (barge-in); pass everything else on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, InputDTMFFrame) and frame.button.value in PROMPTS:
            logger.info(f"caller pressed {frame.button.value}: interrupting")
            await self.broadcast_interruption()  # the serializer sends Twilio's "clear"
            await self.say(frame.button.value)
            return
        await self.push_frame(frame, direction)


def build_pipeline(
    websocket: WebSocket, call: Any, tts_url: str
) -> tuple[PipelineWorker, PhoneMenu]:
    """The pipeline for one call: provider audio in, menu, TTS, provider audio out."""
    serializer = TwilioFrameSerializer(
        stream_sid=call["stream_id"],
        call_sid=call.get("call_id"),
        # With account_sid and auth_token, set auto_hang_up=True to end the call on EndFrame.
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
    )
    transport = FastAPIWebsocketTransport(
        websocket,
        FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=serializer,
        ),
    )
    tts = HuaweiRTTSService(
        url=tts_url,
        settings=HuaweiRTTSService.Settings(voice="english_amy_common"),
        sample_rate=PHONE_RATE,  # requested at 8 kHz: no resampling on the way to the phone
    )
    menu = PhoneMenu(call["stream_id"])
    pipeline = Pipeline(
        [
            transport.input(),
            # A real bot: stt (e.g. DeepgramSTTService), context aggregator, llm here ...
            menu,
            # ... and the assistant context aggregator after the transport output.
            tts,
            transport.output(),
        ]
    )
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(audio_in_sample_rate=PHONE_RATE, audio_out_sample_rate=PHONE_RATE),
    )

    @transport.event_handler("on_client_disconnected")
    async def on_disconnected(transport: FastAPIWebsocketTransport, websocket: WebSocket) -> None:
        await worker.cancel()

    return worker, menu


def create_app(tts_url: str) -> FastAPI:
    """The web app: TwiML on ``POST /`` and the media stream on ``/ws``."""
    app = FastAPI(title="rtts phone bot")

    @app.post("/")
    async def twiml(request: Request) -> Response:
        host = request.headers.get("host", "localhost")
        body = f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="wss://{host}/ws"/></Connect></Response>'
        return Response(content=body, media_type="application/xml")

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        _, call = await parse_telephony_websocket(websocket)
        worker, menu = build_pipeline(websocket, call, tts_url)

        @worker.event_handler("on_pipeline_started")
        async def on_started(worker: PipelineWorker, frame: Frame) -> None:
            await menu.begin()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()

    return app


async def serve(
    host: str, port: int, tts_url: str | None, ready: Callable[[int], Awaitable[None]] | None = None
) -> None:
    """Serve the bot until cancelled (or Ctrl-C)."""
    async with url_or_local_engine(tts_url, "phone-bot") as url:
        server = uvicorn.Server(
            uvicorn.Config(create_app(url), host=host, port=port, log_level="warning")
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()[1]
        print(
            f"phone bot listening on ws://{host}:{bound}/ws (TwiML on POST /); speech from {url}",
            flush=True,
        )
        if ready is not None:
            await ready(bound)
        await task


def main() -> int:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--tts-url", help="rtts URL of a gateway (default: start a local engine)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.tts_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
