"""A circuit breaker for one upstream: closed, open, half-open (pure, no I/O, injected clock).

Modelled on Envoy's outlier detection (consecutive failures eject a host) and circuit
breaking, for a service where every session opens its own connection:

- **closed**: every session is let through. ``failures`` consecutive counted failures
  (:func:`failure_cause`: refused, timed out, 5xx, a 2xx or 3xx instead of the upgrade,
  quota) open the breaker; any success resets the run.
- **open**: no session is let through, so callers are answered (or failed over) at once
  instead of each waiting for the connect timeout. A probe (the upstream handshake only:
  no START, nothing billed) is due ``probe_interval`` after opening; each failed probe
  doubles the wait, up to ``max_probe_interval``.
- **half-open**: the probe succeeded. Up to ``half_open_sessions`` real sessions at a time
  are let through as trials; that many successes close the breaker, one failure opens it
  again (with the next, longer, probe wait).

The breaker only ever decides whether a *new* session may use the upstream: sessions in
progress are never touched. Each admission is a :class:`Ticket`, settled once with the
session's verdict; a ticket from before the last transition no longer counts, so a burst
of sessions that were all opening when the upstream died opens the breaker only once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from rtts_plugin.errors import HandshakeError, RttsError, RttsTimeoutError

# Huawei codes meaning the service (not the request) is overloaded: the account's
# concurrency quota and API Gateway's throttling.
OVERLOAD_CODES: Final = frozenset({"SIS.0312", "APIG.0308"})


class State(enum.IntEnum):
    """Breaker states; the value is what the ``rtts_upstream_breaker_state`` gauge shows."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        """``closed``, ``half_open`` or ``open``."""
        return self.name.lower()


def failure_cause(error: RttsError) -> str | None:
    """Why ``error`` counts against the upstream, or ``None`` if it is not its fault.

    Causes: ``refused``, ``timeout``, ``http_5xx``, ``bad_status`` (a 2xx or a redirect, which
    is not followed, instead of the upgrade), or the quota code. A 401/403/404 or a bad request
    is an answer from a working upstream.
    """
    if isinstance(error, RttsTimeoutError):
        return "timeout"
    if isinstance(error, HandshakeError):
        if error.error_code in OVERLOAD_CODES:
            return error.error_code
        if error.status == 0:
            return "refused"
        if error.status >= 500:
            return "http_5xx"
        if error.status < 400:  # 2xx/3xx instead of 101: the upstream does not speak rtts
            return "bad_status"
    return None


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens, how it probes, and how it closes again."""

    failures: int = 5
    """Consecutive counted failures that open the breaker; 0 turns the breaker off."""
    probe_interval: float = 2.0
    """Seconds from opening to the first probe."""
    max_probe_interval: float = 30.0
    """The longest wait between probes (each failed probe doubles the wait)."""
    half_open_sessions: int = 3
    """Trial sessions let through at a time once a probe succeeded; as many successes close."""

    @property
    def enabled(self) -> bool:
        """Whether the breaker ever opens."""
        return self.failures > 0


@dataclass(frozen=True, slots=True)
class Ticket:
    """One session let through; settle it once with :meth:`CircuitBreaker.settle`."""

    generation: int
    trial: bool


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state, for the metrics and the one log line per transition."""

    old: State
    new: State
    cause: str
    """What caused it: the failures that opened it, ``probe succeeded``, the trials' successes."""
    probe_in: float | None
    """When opening: seconds until the next probe."""


Listener = Callable[[Transition], None]


@dataclass
class CircuitBreaker:
    """The breaker of one upstream. Not thread-safe: one event loop drives it."""

    policy: BreakerPolicy
    clock: Callable[[], float]
    on_transition: Listener = lambda transition: None
    state: State = State.CLOSED
    consecutive: int = 0
    """Counted failures in a row (closed state)."""
    last_cause: str = ""
    """The last counted failure (what opened the breaker)."""
    since: float = field(default=0.0, init=False)
    """When the current state began (clock time)."""
    _generation: int = field(default=0, init=False)
    _trials: int = field(default=0, init=False)  # trial sessions in flight (half-open)
    _trial_successes: int = field(default=0, init=False)
    _probe_wait: float = field(default=0.0, init=False)  # the wait before the current probe
    _probe_at: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.since = self.clock()

    # -- sessions ----------------------------------------------------------------------------

    def admit(self) -> Ticket | None:
        """A ticket if a new session may use the upstream now, else ``None``."""
        if self.state is State.CLOSED:
            return Ticket(self._generation, trial=False)
        if self.state is State.HALF_OPEN and self._trials < self.policy.half_open_sessions:
            self._trials += 1
            return Ticket(self._generation, trial=True)
        return None

    def settle(self, ticket: Ticket, ok: bool | None, cause: str = "") -> None:
        """Record a session's verdict (only the first settle of a ticket should be passed).

        ``True`` success, ``False`` a counted failure (``cause`` names it), ``None``
        neither (the client left, or its request was bad).
        """
        if ticket.generation != self._generation:
            return  # admitted before the last transition: says nothing about the present
        if ticket.trial:
            self._trials -= 1
        if ok is None:
            return
        if not ok:
            self.last_cause = cause or "failure"
            if self.state is State.HALF_OPEN:
                self._open(self._next_wait(), f"trial session failed: {self.last_cause}")
            elif self.state is State.CLOSED and self.policy.enabled:
                self.consecutive += 1
                if self.consecutive >= self.policy.failures:
                    self._open(
                        self.policy.probe_interval,
                        f"{self.consecutive} failure{'s' if self.consecutive > 1 else ''} "
                        f"in a row, last: {self.last_cause}",
                    )
            return
        if self.state is State.CLOSED:
            self.consecutive = 0
        elif self.state is State.HALF_OPEN and ticket.trial:
            self._trial_successes += 1
            if self._trial_successes >= self.policy.half_open_sessions:
                self._move(State.CLOSED, f"{self._trial_successes} trial sessions succeeded")

    # -- probes ------------------------------------------------------------------------------

    def probe_in(self) -> float | None:
        """Seconds until a probe is due (0 if now), or ``None`` unless the breaker is open."""
        if self.state is not State.OPEN:
            return None
        return max(self._probe_at - self.clock(), 0.0)

    @property
    def probe_wait(self) -> float:
        """The wait before the current (or last) probe, in seconds."""
        return self._probe_wait

    def probed(self, ok: bool, cause: str = "") -> None:
        """Record a probe: success half-opens the breaker, failure waits twice as long."""
        if self.state is not State.OPEN:
            return
        if ok:
            self._move(State.HALF_OPEN, "probe succeeded")
        else:
            self.last_cause = cause or "failure"
            self._probe_wait = self._next_wait()
            self._probe_at = self.clock() + self._probe_wait

    # -- internals ---------------------------------------------------------------------------

    def _next_wait(self) -> float:
        return min(
            max(self._probe_wait, self.policy.probe_interval) * 2, self.policy.max_probe_interval
        )

    def _open(self, wait: float, cause: str) -> None:
        self._probe_wait = wait
        self._probe_at = self.clock() + wait
        self._move(State.OPEN, cause)

    def _move(self, new: State, cause: str) -> None:
        old, self.state = self.state, new
        self._generation += 1
        self._trials = self._trial_successes = 0
        self.since = self.clock()
        if new is State.CLOSED:
            self.consecutive = 0
            self._probe_wait = 0.0
        probe_in = self._probe_wait if new is State.OPEN else None
        self.on_transition(Transition(old, new, cause, probe_in))
