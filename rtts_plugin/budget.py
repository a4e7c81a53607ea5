"""The time budget of one utterance: every wait of an rtts synthesis, as deadlines.

Pure (the clock is injected), so the rules are testable without sockets. The rules:

- **Before the first audio byte** every wait (handshake, START, first audio, the pauses
  between retries) is capped by what is left of ``first_audio`` seconds counted from the
  moment the utterance began. Retries happen only inside that budget, so a failure before
  any audio is reported at most ``first_audio`` seconds after the text was handed over,
  however many attempts it took.
- **After the first audio byte** the server may pause up to ``gap`` seconds between frames,
  and must finish (END) by ``end + end_per_char × characters`` seconds after START: the END
  deadline grows with the text, so the longest text a voice accepts can finish at a
  plausible synthesis speed, while a server that trickles forever is still cut off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

Clock = Callable[[], float]

# A retry is only worth it if this much of the budget is left after its back-off pause.
MIN_ATTEMPT_SECONDS: Final = 0.05


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Bounds on each wait of a synthesis, in seconds.

    ``connect``, ``start`` and ``gap`` bound one wait each; ``first_audio`` bounds all the
    waits before the first audio byte together (retries included; infinite: no such bound);
    END is due ``end + end_per_char × len(text)`` seconds after START.
    """

    connect: float = 10.0
    start: float = 10.0
    gap: float = 10.0
    end: float = 60.0
    first_audio: float = math.inf
    end_per_char: float = 0.0

    def end_deadline(self, characters: int) -> float:
        """Seconds from START to END allowed for a text of ``characters`` characters."""
        return self.end + self.end_per_char * characters


@dataclass(frozen=True, slots=True)
class Wait:
    """One bounded wait: what is awaited, for how long, and which limit that is.

    ``limit`` is the configured bound reported in a timeout error, ``setting`` its name;
    ``seconds`` is what is actually left of it (never negative).
    """

    phase: str
    seconds: float
    limit: float
    setting: str


class UtteranceBudget:
    """Deadlines of one utterance (one text piece, all its attempts).

    Create it when the utterance begins; ask :meth:`connect_wait` / :meth:`next_wait` before
    each wait, and tell it what happened (:meth:`started`, :meth:`heard`, :meth:`activity`).
    """

    def __init__(self, timeouts: Timeouts, characters: int, clock: Clock = time.monotonic) -> None:
        """Start the budget now (``clock()``) for a text of ``characters`` characters."""
        self.timeouts = timeouts
        self.characters = characters
        self._clock = clock
        self._began = clock()
        self._started_at: float | None = None
        self._last_activity = self._began
        self.audio_heard = False

    # -- what happened -------------------------------------------------------------------

    def request_sent(self) -> None:
        """START was sent on a new connection: its START and gap clocks run from now."""
        self._started_at = None
        self._last_activity = self._clock()

    def started(self) -> None:
        """The server answered START: the END deadline runs from now."""
        self._started_at = self._last_activity = self._clock()

    def heard(self) -> None:
        """An audio byte arrived: the first-audio budget no longer applies.

        Audio before START (a protocol violation that is tolerated) starts the END clock.
        """
        self.audio_heard = True
        self._last_activity = self._clock()
        if self._started_at is None:
            self._started_at = self._last_activity

    def activity(self) -> None:
        """Any other frame arrived (it restarts the gap)."""
        self._last_activity = self._clock()

    # -- how long to wait ----------------------------------------------------------------

    def first_audio_left(self) -> float:
        """Seconds left of the first-audio budget (infinite once audio was heard)."""
        if self.audio_heard:
            return math.inf
        return max(self.timeouts.first_audio - (self._clock() - self._began), 0.0)

    def _capped(self, phase: str, left: float, limit: float, setting: str) -> Wait:
        """``left`` seconds of ``limit`` (named ``setting``), or less if the budget says so."""
        budget = self.first_audio_left()
        if budget < left:
            return Wait(phase, budget, self.timeouts.first_audio, "first_audio_timeout")
        return Wait(phase, left, limit, setting)

    def connect_wait(self) -> Wait:
        """The bound on the next handshake."""
        connect = self.timeouts.connect
        return self._capped("connect", connect, connect, "connect_timeout")

    def next_wait(self) -> Wait:
        """The bound on the next frame of the synthesis in progress."""
        now = self._clock()
        if self._started_at is None:
            start = self.timeouts.start
            left = max(start - (now - self._last_activity), 0.0)
            return self._capped("START", left, start, "start_timeout")
        gap = self.timeouts.gap
        gap_left = max(gap - (now - self._last_activity), 0.0)
        end_limit = self.timeouts.end_deadline(self.characters)
        end_left = max(end_limit - (now - self._started_at), 0.0)
        if end_left <= gap_left:
            return Wait("END", end_left, end_limit, "end_timeout")
        return self._capped("audio", gap_left, gap, "gap_timeout")

    def allows_retry(self, delay: float) -> bool:
        """Whether a retry after ``delay`` seconds still fits the first-audio budget."""
        return self.first_audio_left() - delay >= MIN_ATTEMPT_SECONDS
