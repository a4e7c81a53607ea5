"""Spreading a burst of work over event-loop turns, so that it cannot stall what streams.

asyncio runs every callback that is ready in one turn before it polls the sockets again. A
storm of callers (800 connecting at once in the capacity benchmark) made one turn admit
all of them and the next start all their upstream handshakes: 100-200 ms in which no
audio frame of a session already speaking was relayed. :class:`PerTurn` lets at most
``limit`` jobs run in a turn and queues the rest, in order, for the following turns; each
turn polls the sockets in between. A caller arriving alone runs at once, with no added
delay.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

logger = logging.getLogger(__name__)


class PerTurn:
    """At most ``limit`` jobs per event-loop turn, first come first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0  # jobs run in this turn
        self._waiting: deque[Callable[[], None]] = deque()
        self._scheduled = False

    @property
    def waiting(self) -> int:
        """Jobs queued for a later turn."""
        return len(self._waiting)

    def now(self) -> bool:
        """Whether a job may run now (it is counted); if not, hand it to :meth:`later`."""
        if self._waiting or self._used >= self.limit:
            return False
        self._used += 1
        self._schedule()  # the count starts again next turn
        return True

    def later(self, job: Callable[[], None]) -> None:
        """Run ``job`` in a later turn, after every job queued before it."""
        self._waiting.append(job)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        self._scheduled = False
        self._used = 0
        while self._waiting and self._used < self.limit:
            self._used += 1
            job = self._waiting.popleft()
            try:
                job()
            except Exception:  # one failed job must not strand the ones behind it
                logger.exception("a queued job failed")
        if self._used:  # the next turn starts the count again, and takes the rest
            self._schedule()
