"""Whether the service should be given work: failure counting and the recovery probe's pace.

Pure (the clock and the random source are injected). pipecat's usability model: a service
that cannot do its job says so (``set_usable(False)``) so a ``ServiceSwitcher`` moves work
to a backup; whoever fixed it says so again (``set_usable(True)``). Here:

- A **permanent** failure (bad credentials, a request the cloud refuses) is pipecat's to
  handle: its category alone makes the service unusable until the settings change.
- A **transient** failure (refused, timed out, 5xx, quota, a close before END) counts; a
  success resets the count. ``max_consecutive_failures`` in a row make the service
  unusable, and a handshake-only probe, paced by :class:`ProbeBackoff`, brings it back.
- A service the probe brought back is **on probation** (a circuit breaker's half-open
  state): the handshake answers, but synthesis may still fail (a cloud that accepts and
  then stalls). Its first failure before a success makes it unusable again at once, and
  the next probes continue the back-off instead of starting over, so a flapping endpoint
  is tried less and less often rather than every second.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from rtts_plugin.budget import Clock
from rtts_plugin.errors import RttsError, retry_after_seconds

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ProbeBackoff:
    """Delays between recovery probes: ``initial``, doubling up to ``cap``, jittered.

    "Equal jitter": each delay is between half and all of its nominal value, so probes
    from many bots spread out but never come back to back.
    """

    initial: float
    cap: float
    uniform: Callable[[float, float], float] = field(default=random.uniform)
    attempts: int = 0

    def next_delay(self) -> float:
        """The pause before the next probe."""
        nominal = min(self.cap, self.initial * 2**self.attempts)
        self.attempts += 1
        return float(nominal / 2 + self.uniform(0, nominal / 2))


async def probe_until_answered(
    handshake: Callable[[], Awaitable[None]],
    backoff: ProbeBackoff,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    label: str = "rtts",
    final: Callable[[RttsError], bool] = lambda _: False,
) -> int:
    """Call ``handshake`` after each of ``backoff``'s pauses until it succeeds.

    ``handshake`` opens (and releases) a connection without sending START, so nothing is
    billed; an :class:`~rtts_plugin.errors.RttsError` means "not yet", unless ``final``
    says no probe can change it (rejected credentials): that one is raised. A refusal's
    ``Retry-After`` lengthens the next pause to what the server asked, up to ``backoff.cap``.
    Returns the number of probes it took.
    """
    asked = 0.0
    while True:
        await sleep(max(backoff.next_delay(), min(asked, backoff.cap)))
        try:
            await handshake()
        except RttsError as exc:
            if final(exc):
                raise
            logger.info("%s: recovery probe %d failed: %s", label, backoff.attempts, exc)
            asked = retry_after_seconds(exc) or 0.0
            continue
        return backoff.attempts


@dataclass(slots=True)
class FailureRun:
    """Consecutive transient failures of utterances, when the run began, and its probes."""

    limit: int
    backoff: ProbeBackoff
    clock: Clock = time.monotonic
    count: int = 0
    since: float | None = None
    unusable: bool = False
    probation: bool = False

    def success(self) -> None:
        """An utterance was spoken: the run is over, probation and back-off included."""
        self.count, self.since, self.unusable, self.probation = 0, None, False, False
        self.backoff.attempts = 0

    def failure(self) -> bool:
        """Record one failed utterance; True when this failure makes the service unusable."""
        self.count += 1
        if self.since is None:
            self.since = self.clock()
        if self.unusable or (self.count < self.limit and not self.probation):
            return False
        self.unusable = True
        return True

    def forgive(self) -> None:
        """Given another chance mid-outage (a settings update): the count starts over.

        The outage's clock and the probes' pace go on until the cloud answers a probe.
        """
        self.count, self.unusable, self.probation = 0, False, False

    def recovered(self) -> None:
        """The probe got an answer: usable again, on probation until an utterance succeeds."""
        self.count, self.unusable, self.probation = 0, False, True

    def outage_seconds(self) -> float:
        """How long the current run of failures has lasted (0 when there is none)."""
        return 0.0 if self.since is None else self.clock() - self.since
