"""Keep the bot talking through an outage: fail over between rtts endpoints, and back.

A ``ServiceSwitcher`` with ``ServiceSwitcherStrategyFailover`` holds several
``HuaweiRTTSService`` instances in order of preference: for example the sidecar gateway
first, Huawei Cloud directly second (or two regions), and the local engine as the last
resort. When the active one declares itself unusable (a run of ``max_consecutive_failures``
transient failures, or a permanent one such as bad credentials), the next utterance goes to
the next usable service. The failed service probes its endpoint in the background with a
handshake only (nothing is billed) and, when it answers, becomes usable again and raises
``on_recovered``; this example then switches back to it.

With URLs, it builds that switcher over real endpoints and speaks a few sentences:

    python examples/failover.py --local-last-resort --url ws://127.0.0.1:8765/v1/PROJECT/rtts
        --url wss://sis-ext.cn-north-4.myhuaweicloud.com/v1/PROJECT/rtts

(one command line; the second URL is Huawei Cloud directly, or another region, with
credentials from ``HUAWEI_RTTS_*`` environment variables).

Without URLs it runs a demonstration with no cloud account: three local-engine gateways
stand in for the primary, the backup and the last resort; the primary and then the backup
are shut down mid-call, then the primary comes back:

    python examples/failover.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    ManuallySwitchServiceFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.service_switcher import ServiceSwitcher, ServiceSwitcherStrategyFailover
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from gateway.server import RunningGateway, run_gateway
from gateway.settings import GatewaySettings
from rtts_plugin import HuaweiRTTSService
from rtts_plugin.config import HuaweiRTTSConnection

VOICE = "english_amy_common"


def rtts_service(url: str, name: str) -> HuaweiRTTSService:
    """One member of the switcher: fails over after one failed utterance, probes quickly."""
    return HuaweiRTTSService(
        connection=HuaweiRTTSConnection(
            url=url,
            # With a backup at hand, one failed utterance is enough to move on; alone, a
            # service would rather keep trying (the default is 3).
            max_consecutive_failures=1,
            probe_interval=0.5,
            probe_max_interval=5.0,
        ),
        settings=HuaweiRTTSService.Settings(voice=VOICE),
        name=name,
    )


def failover_switcher(
    services: list[HuaweiRTTSService],
    switch_to: Callable[[HuaweiRTTSService], Awaitable[None]],
) -> ServiceSwitcher[ServiceSwitcherStrategyFailover]:
    """The services in order of preference; a recovered service becomes active again.

    ``ServiceSwitcherStrategyFailover`` moves forward on failure but never back: when a
    service ahead of the active one recovers, ``switch_to`` is asked to make it active
    (queue a ``ManuallySwitchServiceFrame`` into the pipeline).
    """
    switcher = ServiceSwitcher(
        services=list(services), strategy_type=ServiceSwitcherStrategyFailover
    )

    for rank, service in enumerate(services):

        @service.event_handler("on_recovered")
        async def on_recovered(
            recovered: HuaweiRTTSService, outage: float, rank: int = rank
        ) -> None:
            active = services.index(switcher.strategy.active_service)  # type: ignore[arg-type]
            print(f"{recovered.name} recovered after {outage:.1f} s", flush=True)
            if rank < active:
                await switch_to(recovered)

    @switcher.strategy.event_handler("on_service_switched")
    async def on_switched(_: object, service: FrameProcessor) -> None:
        print(f"now speaking: {service.name}", flush=True)

    return switcher


class Spoken(FrameProcessor):
    """The output side: counts each utterance's audio and says when it stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_bytes = 0
        self.stopped = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Count audio; signal the end of each utterance."""
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.audio_bytes += len(frame.audio)
        elif isinstance(frame, TTSStoppedFrame):
            self.stopped.set()
        await self.push_frame(frame, direction)


Step = Callable[[], Awaitable[None]]


async def converse(
    urls: list[str], steps: list[tuple[str, Step | None]], switched_back: asyncio.Event
) -> int:
    """Speak each step's sentence (after its action, if any); returns how many got audio.

    ``switched_back`` is set each time a recovered service is made active again.
    """
    services = [rtts_service(url, f"tts-{i + 1}") for i, url in enumerate(urls)]
    spoken = Spoken()
    worker_box: list[PipelineWorker] = []

    async def switch_to(service: HuaweiRTTSService) -> None:
        await worker_box[0].queue_frame(ManuallySwitchServiceFrame(service=service))
        switched_back.set()

    switcher = failover_switcher(services, switch_to)
    worker = PipelineWorker(Pipeline([switcher, spoken]), params=PipelineParams())
    worker_box.append(worker)
    heard = 0

    async def script() -> None:
        nonlocal heard
        for sentence, action in steps:
            if action is not None:
                await action()
            spoken.stopped.clear()
            before = spoken.audio_bytes
            await worker.queue_frame(TTSSpeakFrame(sentence))
            await asyncio.wait_for(spoken.stopped.wait(), timeout=30)
            got = spoken.audio_bytes - before
            heard += got > 0
            print(f"{sentence!r}: {'spoken' if got else 'lost (an ErrorFrame)'}", flush=True)
        await worker.queue_frame(EndFrame())

    @worker.event_handler("on_pipeline_started")
    async def on_started(_: PipelineWorker, frame: Frame) -> None:
        worker.create_task(script(), name="failover-script")

    runner = WorkerRunner(handle_sigint=True)
    await runner.add_workers(worker)
    await runner.run()
    return heard


@asynccontextmanager
async def local_gateway(port: int = 0) -> AsyncIterator[RunningGateway]:
    """A local-engine gateway on loopback (``port`` 0: any free one)."""
    async with run_gateway(
        GatewaySettings(port=port, metrics_port=0, backend="local", drain_timeout=0.5)
    ) as running:
        yield running


async def demo() -> int:
    """Primary and backup die mid-call, the last resort speaks, the primary comes back."""
    async with AsyncExitStack() as stack:
        primary_stack = AsyncExitStack()
        backup_stack = AsyncExitStack()
        primary = await primary_stack.enter_async_context(local_gateway())
        backup = await backup_stack.enter_async_context(local_gateway())
        last = await stack.enter_async_context(local_gateway())
        stack.push_async_callback(primary_stack.aclose)
        stack.push_async_callback(backup_stack.aclose)
        port = primary.port
        switched_back = asyncio.Event()

        async def primary_dies() -> None:
            print("-- the primary goes down", flush=True)
            await primary_stack.aclose()

        async def backup_dies() -> None:
            print("-- the backup goes down too", flush=True)
            await backup_stack.aclose()

        async def primary_returns() -> None:
            print("-- the primary is back", flush=True)
            await primary_stack.enter_async_context(local_gateway(port))
            # Its probe notices within its back-off (at most probe_max_interval, 5 s).
            await asyncio.wait_for(switched_back.wait(), timeout=15)

        steps: list[tuple[str, Step | None]] = [
            ("Hello, you are talking to the primary.", None),
            ("This sentence was in flight when it died.", primary_dies),
            ("The backup carries on.", None),
            ("Another sentence in flight.", backup_dies),
            ("The local engine is the last resort.", None),
            ("The primary speaks again.", primary_returns),
        ]
        urls = [primary.url("demo"), backup.url("demo"), last.url("demo")]
        return await converse(urls, steps, switched_back)


def main() -> int:
    """Run the demonstration, or speak over the given endpoints."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", action="append", default=[], help="an rtts URL, most preferred first"
    )
    parser.add_argument(
        "--local-last-resort",
        action="store_true",
        help="add a local-engine gateway after the given URLs",
    )
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    if not args.url:
        heard = asyncio.run(demo())
        return 0 if heard == 4 else 1

    async def run() -> int:
        async with AsyncExitStack() as stack:
            urls = list(args.url)
            if args.local_last_resort:
                urls.append((await stack.enter_async_context(local_gateway())).url("local"))
            sentences = ["Hello.", "This is a failover test.", "Goodbye."]
            steps: list[tuple[str, Step | None]] = [(sentence, None) for sentence in sentences]
            return await converse(urls, steps, asyncio.Event())

    heard = asyncio.run(run())
    return 0 if heard else 1


if __name__ == "__main__":
    sys.exit(main())
