"""The circuit breaker as a state machine, on a fake clock (no sockets): gateway.breaker."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.breaker import (
    BreakerPolicy,
    CircuitBreaker,
    State,
    Ticket,
    Transition,
    failure_cause,
)
from rtts_plugin.errors import (
    AuthenticationError,
    HandshakeError,
    InvalidRequestError,
    RttsTimeoutError,
    SynthesisError,
)


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(**policy: float) -> tuple[CircuitBreaker, Clock, list[Transition]]:
    clock, seen = Clock(), []
    options = {"failures": 3, "probe_interval": 2.0, "max_probe_interval": 10.0, **policy}
    cb = CircuitBreaker(BreakerPolicy(**options), clock, seen.append)  # type: ignore[arg-type]
    return cb, clock, seen


def fail(cb: CircuitBreaker, times: int = 1, cause: str = "timeout") -> None:
    for _ in range(times):
        ticket = cb.admit()
        assert ticket is not None
        cb.settle(ticket, False, cause)


def open_breaker(cb: CircuitBreaker) -> None:
    fail(cb, cb.policy.failures)
    assert cb.state is State.OPEN


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (HandshakeError(0, "", "cannot connect: connection refused"), "refused"),
        (RttsTimeoutError("connect", 8), "timeout"),
        (HandshakeError(500, "", "internal"), "http_5xx"),
        (HandshakeError(502, "", "bad gateway"), "http_5xx"),
        (HandshakeError(503, "", "circuit open"), "http_5xx"),
        (HandshakeError(200, "", "OK"), "bad_status"),
        (HandshakeError(302, "", "Found"), "bad_status"),
        (HandshakeError(429, "APIG.0308", "throttled"), "APIG.0308"),
        (HandshakeError(429, "SIS.0312", "concurrency"), "SIS.0312"),
        (HandshakeError(401, "APIG.0301", "bad token"), None),
        (HandshakeError(403, "", "forbidden"), None),
        (HandshakeError(404, "APIG.0101", "no such API"), None),
        (HandshakeError(400, "", "bad request"), None),
        (AuthenticationError("IAM said no"), None),
        (InvalidRequestError("SIS.0411", "bad voice"), None),
        (SynthesisError("error", "SIS.0411", "bad voice", "t"), None),
    ],
)
def test_what_counts_against_the_upstream(error: Exception, cause: str | None) -> None:
    assert failure_cause(error) == cause  # type: ignore[arg-type]


def test_a_run_of_failures_opens_it_and_a_success_resets_the_run() -> None:
    cb, _, seen = breaker()
    fail(cb, 2)
    ticket = cb.admit()
    assert ticket is not None
    cb.settle(ticket, True)
    assert cb.consecutive == 0
    fail(cb, 2)
    assert cb.state is State.CLOSED
    fail(cb, 1, "refused")
    assert cb.state is State.OPEN and cb.admit() is None
    assert [(t.old, t.new) for t in seen] == [(State.CLOSED, State.OPEN)]
    assert "3 failures in a row, last: refused" in seen[0].cause and seen[0].probe_in == 2.0


def test_the_clients_own_errors_and_unknown_verdicts_do_not_count() -> None:
    cb, _, _ = breaker()
    for _ in range(10):
        ticket = cb.admit()
        assert ticket is not None
        cb.settle(ticket, None)
    assert cb.state is State.CLOSED and cb.consecutive == 0


def test_probes_back_off_to_the_cap_and_a_good_probe_half_opens() -> None:
    cb, clock, seen = breaker()
    assert cb.probe_in() is None  # closed: nothing to probe
    open_breaker(cb)
    waits = []
    for _ in range(5):
        waits.append(cb.probe_in())
        clock.now += cb.probe_in() or 0
        assert cb.probe_in() == 0
        cb.probed(False, "timeout")
    assert waits == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert cb.state is State.OPEN and cb.admit() is None
    clock.now += 10
    cb.probed(True)
    assert cb.state is State.HALF_OPEN and cb.probe_in() is None
    assert [t.new for t in seen] == [State.OPEN, State.HALF_OPEN]


def test_half_open_lets_a_few_trials_through_and_their_successes_close_it() -> None:
    cb, _, seen = breaker(half_open_sessions=2)
    open_breaker(cb)
    cb.probed(True)
    first, second = cb.admit(), cb.admit()
    assert first is not None and second is not None and first.trial and second.trial
    assert cb.admit() is None  # two at a time
    cb.settle(first, None)  # a client that left frees its slot without a verdict
    third = cb.admit()
    assert third is not None and cb.admit() is None
    cb.settle(second, True)
    assert cb.state is State.HALF_OPEN
    cb.settle(third, True)
    assert cb.state is State.CLOSED and cb.consecutive == 0
    ticket = cb.admit()
    assert ticket is not None and not ticket.trial
    assert [t.new for t in seen] == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_a_failed_trial_opens_it_again_with_a_longer_wait() -> None:
    cb, _, seen = breaker()
    open_breaker(cb)
    cb.probed(True)
    trial = cb.admit()
    assert trial is not None
    cb.settle(trial, False, "http_5xx")
    assert cb.state is State.OPEN and cb.probe_in() == 4.0
    assert seen[-1].cause == "trial session failed: http_5xx"


def test_closing_resets_the_backoff() -> None:
    cb, _, _ = breaker(half_open_sessions=1)
    open_breaker(cb)
    cb.probed(False)
    cb.probed(True)
    trial = cb.admit()
    assert trial is not None
    cb.settle(trial, True)
    open_breaker(cb)
    assert cb.probe_in() == 2.0


def test_verdicts_from_before_a_transition_are_ignored() -> None:
    cb, _, seen = breaker()
    early = [cb.admit() for _ in range(10)]  # a burst, all opening when the upstream died
    for ticket in early:
        assert ticket is not None
        cb.settle(ticket, False, "timeout")
    assert cb.state is State.OPEN and len(seen) == 1  # opened once, not three times
    cb.probed(True)
    stale = Ticket(0, trial=False)
    cb.settle(stale, True)
    assert cb.state is State.HALF_OPEN


def test_a_disabled_breaker_never_opens() -> None:
    cb, _, seen = breaker(failures=0)
    fail(cb, 100)
    assert cb.state is State.CLOSED and not seen and cb.policy.enabled is False


@given(
    st.lists(
        st.sampled_from(["admit", "ok", "fail", "none", "tick", "probe_ok", "probe_fail"]),
        max_size=200,
    )
)
def test_invariants_hold_for_any_sequence_of_events(events: list[str]) -> None:
    cb, clock, seen = breaker(half_open_sessions=2)
    tickets: list[Ticket] = []
    for event in events:
        if event == "admit":
            ticket = cb.admit()
            if ticket is not None:
                tickets.append(ticket)
        elif event in ("ok", "fail", "none") and tickets:
            cb.settle(tickets.pop(0), {"ok": True, "fail": False, "none": None}[event], "x")
        elif event == "tick":
            clock.now += 1.5
        elif event.startswith("probe") and cb.probe_in() == 0:
            cb.probed(event == "probe_ok")
        live_trials = [t for t in tickets if t.trial and t.generation == cb._generation]
        assert len(live_trials) <= 2
        if cb.state is State.OPEN:
            assert cb.admit() is None
            wait = cb.probe_in()
            assert wait is not None and 0 <= wait <= 10.0
        else:
            assert cb.probe_in() is None
        assert cb.consecutive < 3 or cb.state is not State.CLOSED
    for before, after in itertools.pairwise(seen):
        assert before.new == after.old and before.new != before.old
