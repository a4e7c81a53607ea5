"""Readiness: whether this gateway's pod can take calls, decided from its own state only.

``/readyz`` is a Kubernetes readiness (and startup) probe. Huawei Cloud is shared by every
pod, so if its reachability decided readiness, a cloud outage would take every pod out of
the Service at once, including bots that could still answer with a fallback voice or a
transfer, and during the outage no new pod could even start. So readiness is the gateway's
own state: listening, the local engine answering (when this gateway has one), a configured
fallback available, not draining. The cloud's state is reported beside it (the body's
``detail``, ``rtts_upstream_reachable``, the ``RttsUpstreamUnreachable`` alert), never in the
status code. Pure: the facts come in as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReadinessFacts:
    """What the gateway knows about itself when asked whether it is ready."""

    listening: bool
    """The rtts port accepts connections."""
    draining: bool
    """Shutting down: sessions in progress finish, new ones are refused."""
    engine: bool | None = None
    """The local engine answers (backend ``local``); ``None``: this gateway has none."""
    fallback: bool | None = None
    """A configured fallback can serve; ``None``: no fallback is configured."""
    secondary: bool = False
    """A second upstream takes the sessions the first cannot (``--secondary-url``)."""
    upstream: bool | None = None
    """The remote upstream answered its last probe; ``None``: not probed (yet). Reported only."""
    upstream_detail: str = ""
    """What the last upstream probe found, for the body."""


def decide(facts: ReadinessFacts) -> tuple[bool, str]:
    """``(ready, detail)``: ready unless the gateway itself cannot take a session.

    The upstream's reachability never makes the gateway not ready; it is only described.
    """
    if facts.draining:
        return False, "draining: sessions in progress finish, new ones go to another pod"
    if not facts.listening:
        return False, "not listening yet"
    if facts.engine is False:
        return False, "the local engine does not answer"
    if facts.fallback is False:
        return False, "the configured fallback is not available"
    if facts.upstream is False:
        takers = [
            taker
            for taker, present in (
                ("the secondary upstream", facts.secondary),
                ("the fallback", bool(facts.fallback)),
            )
            if present
        ]
        consequence = (
            f"sessions go to {', then '.join(takers)}"
            if takers
            else "new sessions are refused (502/504) until it returns"
        )
        return True, (
            f"ready; {facts.upstream_detail}: {consequence} (readiness does not depend on "
            "the upstream; see rtts_upstream_reachable)"
        )
    return True, f"ready; {facts.upstream_detail}" if facts.upstream_detail else "ready"
