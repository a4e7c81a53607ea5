"""The gateway: the rtts front door, the upstream (Huawei Cloud or the local engine), limits.

Clients connect to ``ws://HOST:PORT/v1/{project_id}/rtts`` exactly as they would to Huawei
Cloud. During the client's handshake the gateway checks the path, the project and the
optional gateway key, enforces the session limit, and opens the upstream connection with
its own credentials; only if that succeeds is the client accepted, so the client sees the
upstream's handshake outcome (502/504 for network failures). Then every frame is relayed
unchanged, socket to socket (:mod:`gateway.splice`), and metered (:mod:`gateway.meter`).
With the local backend the upstream is the embedded engine, served on an internal loopback
port, so both backends are relayed and metered by the same code. Which upstream a session
gets (circuit breakers, a second upstream, the local engine as a fallback) is decided in
:mod:`gateway.upstreams`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import hmac
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final

from websockets.asyncio.server import serve
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from gateway.breaker import BreakerPolicy, CircuitBreaker, State
from gateway.deadlines import Deadlines
from gateway.dial import (
    PRECONNECT_OUTCOMES,
    Dial,
    Preconnect,
    PreconnectBudget,
    PreconnectOutcome,
)
from gateway.engine.logs import engine_websockets_logger
from gateway.engine.session import EngineLimits, LocalEngine
from gateway.engine.worker import SynthesisWorker
from gateway.errors import GatewayError, HandshakesBusy
from gateway.frontdoor import FrontDoor, Upgrade, json_response, read_upgrade
from gateway.http import build_app, start_http
from gateway.meter import SessionMeter
from gateway.metrics import GatewayMetrics
from gateway.readiness import ReadinessFacts, decide
from gateway.settings import GatewaySettings
from gateway.spares import SparePool
from gateway.splice import BAD_GATEWAY, Splice
from gateway.turns import PerTurn
from gateway.upstream_probe import UpstreamProbe
from gateway.upstream_socket import UpstreamSocket, client_tls
from gateway.upstreams import AllOpen, Failover, Lease, Upstream, UpstreamName
from rtts_plugin.auth import HandshakeAuth, NoAuth
from rtts_plugin.errors import AuthenticationError, HandshakeError, RttsError, RttsTimeoutError

logger = logging.getLogger(__name__)

RTTS_PATH: Final = re.compile(r"^/v1/(?P<project_id>[A-Za-z0-9_-]{1,128})/rtts/?$")
# How long clients get to answer our close frame at shutdown before their socket is dropped.
_CLOSE_GRACE_SECONDS: Final = 1.0
_WATCHDOG_PERIOD: Final = 0.25
# The upstream normally ends an idle session itself (FATAL_ERROR SIS.0304); this is a backstop.
_START_GRACE_SECONDS: Final = 5.0
_TRIM_INTERVAL_SECONDS: Final = 10.0
_SHUTTING_DOWN: Final = "gateway shutting down"  # the close reason at the end of a drain
# Spares to Huawei Cloud are replaced well before its idle rule (about 20 s) closes them.
_SPARE_MAX_AGE_SECONDS: Final = 15.0
_MAX_UPSTREAMS_OPENING: Final = 32
# The share of a caller's connect budget it may wait for one of them: a handshake starts
# with at least the rest, so a timeout is the upstream's own, not the queue's.
_SLOT_WAIT_SHARE: Final = 0.5
# How long a client gets to send its whole upgrade request.
_REQUEST_TIMEOUT_SECONDS: Final = 10.0
# Pending connections the kernel queues: a burst of callers must not wait on SYN retries.
_LISTEN_BACKLOG: Final = 1024
# Connections in their opening handshake at once (each holds at most a request and early
# bytes, for at most the request timeout); more are answered 503 at once.
_MAX_HANDSHAKES: Final = 1024
# Sessions admitted (and their upstream handshakes started) per event-loop turn: a storm of
# callers is spread over turns, and the sockets of sessions already speaking are read in
# between (gateway.turns).
_ADMISSIONS_PER_TURN: Final = 16


@functools.lru_cache(maxsize=256)  # on every session's path, for the same few paths
def project_id_of(path: str) -> str | None:
    """The project id in an rtts request path, or ``None`` if the path is not an rtts one."""
    # The request target is a path and maybe a query; never parse it as a URL ("//[" is not one).
    match = RTTS_PATH.match(path.partition("?")[0])
    return match["project_id"] if match else None


@dataclass(eq=False)
class _Session:
    splice: Splice
    meter: SessionMeter
    lease: Lease
    opened: float = field(default_factory=time.monotonic)


class Gateway:
    """Admission, upstream, relay bookkeeping, watchdog and readiness of one gateway."""

    handshake_timeout = _REQUEST_TIMEOUT_SECONDS

    def __init__(
        self,
        settings: GatewaySettings,
        upstream_base: str,
        auth: HandshakeAuth,
        local_base: str | None = None,
    ) -> None:
        self.settings = settings
        self.backend = settings.resolved_backend
        self.metrics = GatewayMetrics(self.backend, settings.max_sessions, settings.relay_path)
        self._compiled = settings.relay_path == "compiled"
        self._on_spare = self.metrics.sessions_on_spare.labels(self.backend)
        self._upstream_base = upstream_base
        self._allowed = settings.project_allow_list
        self._key = (
            settings.gateway_key.get_secret_value().encode() if settings.gateway_key else None
        )
        self.failover = Failover(
            _upstreams(settings, upstream_base, auth, local_base),
            self.metrics,
            settings.upstream_connect_timeout,
        )
        self.spares = SparePool(
            self._open_spare,
            settings.upstream_spares,
            # Well inside the idle rule: the cloud's 20 s, or the local engine's own setting.
            max_age=_SPARE_MAX_AGE_SECONDS
            if self.backend == "huawei"
            else 0.75 * settings.idle_timeout,
            on_change=self.metrics.upstream_spares.labels(self.backend).set,
        )
        self._doors: set[FrontDoor] = set()  # client sockets not yet spliced or closed
        self._admissions = PerTurn(_ADMISSIONS_PER_TURN)
        self._preconnects = PreconnectBudget()
        self._preconnect_outcomes = {  # made once: no labels() per caller
            outcome: self.metrics.upstream_preconnects.labels(self.backend, outcome)
            for outcome in PRECONNECT_OUTCOMES
        }
        self._opening: dict[FrontDoor, asyncio.Task[None]] = {}  # admitted, upstream opening
        # Audio in flight comes first: a burst of new sessions opens its upstreams a few at a
        # time, so their handshakes do not hold up the frames of sessions already streaming.
        self._opening_slots = _Slots(_MAX_UPSTREAMS_OPENING)
        self.sessions: set[_Session] = set()
        self._checks: Deadlines[_Session] = Deadlines()  # when each next needs the watchdog
        self._unsettled: set[_Session] = set()  # sessions whose breaker verdict is open
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self._trim_timer: asyncio.TimerHandle | None = None
        self.server: asyncio.Server | None = None  # set once the rtts port listens
        # Read when scraped: exact at any moment, and nothing to update per session.
        self.metrics.active_sessions.labels(self.backend).set_function(lambda: self.active_sessions)
        reachable = self.metrics.upstream_reachable.labels(self.backend)
        self.upstream_probe = UpstreamProbe(upstream_base, lambda up: reachable.set(1 if up else 0))
        # --fallback local: readiness needs the embedded engine answering (it is in-process,
        # so this only fails if the engine's listener died).
        self.fallback_probe = (
            UpstreamProbe(local_base, lambda _up: None) if local_base is not None else None
        )

    @property
    def active_sessions(self) -> int:
        """Sessions admitted and not yet finished (including those still opening)."""
        return len(self.sessions) + len(self._opening)

    async def wait_idle(self) -> None:
        """Return once no session is in progress."""
        await self._idle.wait()

    def door(self) -> FrontDoor:
        """A front door for a newly accepted client socket (503 when too many are open)."""
        busy = len(self._doors) >= _MAX_HANDSHAKES
        door = FrontDoor(self, busy=busy, compiled=self._compiled)
        if not busy:
            door.preconnect = self._preconnect()
        self._doors.add(door)
        return door

    def _preconnect(self) -> Preconnect | None:
        """The primary's TCP connect for a caller who just connected, if it may be used.

        Only where the caller's session is likely to dial (see :meth:`_dial`) and the budget
        allows (gateway.dial). Not with spares (a caller usually takes one), nor when
        admissions are queued or every handshake slot is taken (a storm: the connect would
        wait with them).
        """
        primary = self.failover.primary
        if (
            self.draining
            or self.settings.upstream_spares
            or self._admissions.waiting
            or self._opening_slots.locked()
            or primary.breaker.state is not State.CLOSED
        ):
            return None
        address = primary.address()
        if address is None or not self._preconnects.spend():
            return None
        try:
            return Preconnect(address, self._preconnect_ended)
        except OSError:  # no socket, or the connect failed at once: the usual path says why
            return None

    def _preconnect_ended(self, outcome: PreconnectOutcome) -> None:
        self._preconnect_outcomes[outcome].inc()

    def door_closed(self, door: FrontDoor) -> None:
        """Forget a door whose socket closed or was handed to its splice.

        A caller who hangs up while its upstream is opening needs nothing more: its wait
        for a handshake slot, or its upstream handshake, is cancelled at once, so the slot
        goes to a caller still there and no upstream is opened for nobody.
        """
        self._doors.discard(door)
        if door.closed and not door.handed_over:
            opening = self._opening.get(door)
            if opening is not None:
                opening.cancel()

    # -- handshake -------------------------------------------------------------------------

    def admit(self, door: FrontDoor, request: Request | Upgrade) -> Response | None:
        """Refuse the request, or start opening the upstream for it (None).

        In a storm of callers, at most :data:`_ADMISSIONS_PER_TURN` are admitted per loop
        turn (:mod:`gateway.turns`); the others wait their turn, in order.
        """
        if self._admissions.now():
            return self._admit_answering_bugs(door, request)
        self._admissions.later(functools.partial(self._admit_queued, door, request))
        return None

    def _admit_queued(self, door: FrontDoor, request: Request | Upgrade) -> None:
        if door.closed:  # the caller left while it waited its turn
            return
        refusal = self._admit_answering_bugs(door, request)
        if refusal is not None:
            door.reply(refusal)

    def _admit_answering_bugs(self, door: FrontDoor, request: Request | Upgrade) -> Response | None:
        """:meth:`_admit_now`, with a bug in it answered 500 (at once or queued alike)."""
        try:
            return self._admit_now(door, request)
        except Exception:
            logger.exception("admitting a session failed in the gateway")
            return _internal_error()

    def _admit_now(self, door: FrontDoor, request: Request | Upgrade) -> Response | None:
        accepted = time.monotonic()
        upgrade = request if isinstance(request, Upgrade) else read_upgrade(request)
        project_id = project_id_of(upgrade.path)
        if project_id is None:
            return json_response(
                404, "APIG.0101", "API not found: connect to /v1/{project_id}/rtts"
            )
        key = upgrade.key
        if isinstance(key, Response):
            return key
        refusal = self._refusal(project_id, upgrade.authorization)
        if refusal is not None:
            meter = SessionMeter(self.metrics, project_id, accepted=accepted)
            meter.fail("rejected", refusal.status_code)
            meter.finish()
            return refusal
        self._preconnects.earn()
        # The upstream connection first (gateway.dial): the rest is made while it opens.
        preconnect, door.preconnect = door.preconnect, None
        try:
            dial = self._dial(project_id, preconnect)
        finally:
            if preconnect is not None:
                preconnect.close()  # its end: closed if untaken, counted used if taken
        try:
            meter = SessionMeter(self.metrics, project_id, accepted=accepted)
            task = asyncio.get_running_loop().create_task(self._serve(door, key, meter, dial))
        except BaseException:  # a bug (answered 500): nothing may stay open or held
            if dial is not None:
                dial.discard()
            raise
        task.add_done_callback(functools.partial(self._served, door, meter, dial))
        self._opening[door] = task
        self._idle.clear()
        return None

    def _served(self, door: FrontDoor, meter: SessionMeter, dial: Dial | None, _: object) -> None:
        """A session's task is over; if it was cancelled before it ever ran, end it here."""
        if dial is not None:
            dial.discard()  # nothing, unless the task never got to take it
        if self._opening.pop(door, None) is None:
            return  # it ran: _serve ended the session
        # As _open_upstream says it: the caller hung up, or the gateway is shutting down.
        if door.closed:
            meter.fail("client_cancelled")
        else:
            meter.fail("timeout", "draining")
        meter.finish()
        if not self.active_sessions:
            self._idle.set()

    def _dial(self, project_id: str, preconnect: Preconnect | None = None) -> Dial | None:
        """The session's primary connection started now, if nothing needs deciding first.

        As :meth:`_open_upstream` would start it, only without its waits: the primary's
        breaker closed, no spare for the project, a handshake slot free (taken here). On
        the caller's ``preconnect`` if it can be used.
        """
        primary = self.failover.primary
        if (
            primary.breaker.state is not State.CLOSED
            or (self.settings.upstream_spares and self.spares.has(project_id))
            or not self._opening_slots.take_now()
        ):
            return None
        try:
            dial = primary.dial(project_id, self._opening_slots.release, preconnect)
        except BaseException:  # a bug: the usual path meets it again, without a slot held
            self._opening_slots.release()
            raise
        if dial is None:
            self._opening_slots.release()
        return dial

    def _refusal(self, project_id: str, authorization: str | None) -> Response | None:
        if self.draining:
            return _draining()
        if self._key is not None:
            scheme, _, presented = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode(), self._key
            ):
                return json_response(
                    401,
                    "APIG.0301",
                    "gateway key missing or wrong: send Authorization: Bearer <key>",
                )
        if self._allowed is not None and project_id not in self._allowed:
            return json_response(403, "", f"project {project_id!r} is not served by this gateway")
        if self.active_sessions >= self.settings.max_sessions:
            return json_response(
                429,
                "SIS.0312",
                f"concurrency limit of this gateway reached ({self.settings.max_sessions} "
                "sessions); retry later",
            )
        return None

    async def _open_spare(self, project_id: str) -> UpstreamSocket:
        """A spare's handshake: one of the gateway's handshake slots, if a caller needs none."""
        primary = self.failover.primary
        if primary.breaker.state is not State.CLOSED:  # no spares for an upstream in doubt
            raise HandshakeError(0, "", f"circuit of upstream {primary.name} is not closed")
        if self._opening_slots.locked():  # callers first: a spare never waits for a slot
            raise HandshakeError(0, "", "every upstream handshake slot is in use")
        async with self._opening_slots:
            return await primary.connect(project_id, self.settings.upstream_connect_timeout)

    async def _open_upstream(
        self, meter: SessionMeter, door: FrontDoor, key: str, dial: Dial | None
    ) -> tuple[UpstreamSocket, Lease] | Response | None:
        """The session's upstream connection (on the first upstream that can serve it).

        Else the refusal to send the caller, or None if the caller hung up meanwhile. The
        client's 101 is written the moment an upstream accepts, from the upstream
        socket's callback: not a loop turn later, when this returns. ``dial``: the primary
        connection :meth:`_dial` started, taken over by the primary's attempt.
        """

        def answer_client() -> None:
            if not door.closed and not door.handed_over:
                door.accept(key)

        async def opener(upstream: Upstream, budget: float) -> UpstreamSocket:
            # What the next caller needs made (a spare, a ClientHello) waits for this
            # session's first audio or its end (a spare's, at most 20 ms: SparePool.take).
            meter.on_first_audio = functools.partial(self._first_audio, upstream, meter.project_id)
            if upstream is self.failover.primary and self.settings.upstream_spares:
                spare = self.spares.take(meter.project_id)  # also marks the project as in use
                if spare is not None:  # one came after the admission: the dial is dropped
                    self._on_spare.inc()
                    if dial is not None:
                        dial.discard()
                    return spare
            if dial is not None and upstream is self.failover.primary:
                return await self._take_dial(dial, upstream, budget, meter, answer_client)
            if dial is not None:  # primary passed over: free its slot before this one waits
                dial.discard()
            queued = time.monotonic()  # the wait for a slot counts in the budget too
            # The fallback engine runs in this process: no network wait, no TLS, no slot.
            limited = upstream.name != "local"
            if limited:
                await self._handshake_slot(budget)
            try:
                started = time.monotonic()
                connection = await upstream.connect(
                    meter.project_id, max(budget - (started - queued), 0.001), answer_client
                )
            finally:
                if limited:
                    self._opening_slots.release()
            meter.upstream_connect_s = time.monotonic() - started
            return connection

        try:
            opened = await self.failover.open(meter.project_id, opener)
        except asyncio.CancelledError:
            if door.closed:  # the caller hung up (door_closed): an ending, not an error
                meter.fail("client_cancelled")
                return None
            meter.fail("timeout", "draining")  # shutting down while the upstream was opening
            _refuse(door, _draining())
            raise
        finally:
            del self._opening[door]  # no longer opening, whatever the outcome
            if dial is not None:
                dial.discard()  # no attempt took it (every breaker open): close it now
        if isinstance(opened, HandshakesBusy):
            meter.fail("rejected", "busy")
            return json_response(503, "", str(opened), {"Retry-After": "1"})
        if isinstance(opened, AllOpen):
            meter.fail("rejected", "circuit_open")
            return opened.response()
        if isinstance(opened, RttsError):
            response, code = _handshake_failure(opened)
            meter.fail("handshake_failed", code)
            return response
        return opened.connection, opened.lease

    async def _handshake_slot(self, budget: float) -> None:
        """One of the upstream handshake slots, waited for at most a share of ``budget``.

        Raises:
            HandshakesBusy: none came free in time.
        """
        if not self._opening_slots.locked():
            await self._opening_slots.acquire()  # returns at once
            return
        patience = budget * _SLOT_WAIT_SHARE
        try:
            async with asyncio.timeout(patience):
                await self._opening_slots.acquire()
        except TimeoutError:
            raise HandshakesBusy(_MAX_UPSTREAMS_OPENING, patience) from None

    @staticmethod
    async def _take_dial(
        dial: Dial,
        upstream: Upstream,
        budget: float,
        meter: SessionMeter,
        answer_client: Callable[[], None],
    ) -> UpstreamSocket:
        """The primary's attempt on the connection :meth:`_dial` started (its slot too)."""
        try:
            connection = await upstream.connect(meter.project_id, budget, answer_client, dial)
        finally:
            dial.release_slot()
        meter.upstream_connect_s = time.monotonic() - dial.started
        return connection

    def _first_audio(self, upstream: Upstream, project_id: str) -> None:
        """A session's first audio is out: make what the next caller needs, off its path."""
        self.spares.replenish(project_id)
        upstream.prepare()

    # -- sessions --------------------------------------------------------------------------

    async def _serve(
        self, door: FrontDoor, key: str, meter: SessionMeter, dial: Dial | None = None
    ) -> None:
        """Open the upstream, answer the client, relay until both sides are closed."""
        if dial is not None:  # its request is out: make the caller's 101 while it is answered
            door.prepare_accept(key)
        try:
            upstream = await self._open_upstream(meter, door, key, dial)
            if upstream is None:
                return
            if isinstance(upstream, Response):
                _refuse(door, upstream)
                return
            connection, lease = upstream
            try:
                if door.closed:  # the client gave up during the upstream handshake
                    connection.abort()
                    meter.fail("client_cancelled")
                    lease.settle(True)  # the upstream did answer
                    return
                assert door.transport is not None
                splice = Splice(
                    # Accepted when the upstream did, unless it was a spare (accepted now).
                    door.transport if door.handed_over else door.accept(key),
                    bytes(door.early),
                    connection,
                    meter,
                    max_message_bytes=self.settings.max_message_bytes,
                    compiled=self._compiled,
                )
                session = _Session(splice, meter, lease)
                self.sessions.add(session)
                self._checks.file(self._next_check(session), session)
                if not lease.settled:
                    self._unsettled.add(session)
                try:
                    await splice.run()
                finally:
                    self.sessions.discard(session)
                    self._unsettled.discard(session)
            finally:
                lease.watch(meter, final=True)
                if meter.first_audio is None:  # else made then
                    lease.upstream.prepare()
        except Exception:  # a bug must not leave the client waiting for an answer
            logger.exception("session of project %s failed in the gateway", meter.project_id)
            meter.fail("rejected", 500)
            door.reply(_internal_error())
            if door.handed_over and door.transport is not None:
                door.transport.abort()  # mid-session: nothing sensible can follow
        finally:
            meter.finish()
            self.spares.replenish(meter.project_id)
            if not self.active_sessions:
                self._idle.set()
                self._release_free_memory()

    def _release_free_memory(self) -> None:
        """Give freed heap back to the OS once idle; if a trim ran under 10 s ago, later."""
        if self._trim_timer is not None or not self._idle.is_set():
            return
        wait = _trim_free_memory()
        if wait:
            loop = asyncio.get_running_loop()
            self._trim_timer = loop.call_later(wait, self._deferred_trim)

    def _deferred_trim(self) -> None:
        self._trim_timer = None
        self._release_free_memory()

    async def watchdog(self) -> None:
        """Close sessions gone quiet, never started, or running too long.

        Each session is looked at only once its earliest deadline has come
        (:mod:`gateway.deadlines`), and sessions whose breaker verdict is still open are
        watched every tick until it is settled. Also keeps the ``rtts_gateway_ready`` gauge
        current, so dashboards and alerts see readiness even when nothing polls ``/readyz``.
        """
        ready = self.metrics.ready.labels(self.backend)
        while True:
            await asyncio.sleep(_WATCHDOG_PERIOD)
            now = time.monotonic()
            ready.set(1 if self._readiness()[0] else 0)
            for session in list(self._unsettled):  # a half-open breaker waits on these
                session.lease.watch(session.meter)
                if session.lease.settled:
                    self._unsettled.discard(session)
            self._checks.prune(self.sessions)
            for session in self._checks.due(now):
                # A session already being closed is the close timeout's, not ours again.
                if session not in self.sessions or not session.splice.relaying:
                    continue
                overdue = self._overdue(session, now)
                if overdue is None:
                    self._checks.file(self._next_check(session), session)
                    continue
                outcome, reason, client_code = overdue
                session.meter.fail(outcome, "timeout")
                logger.warning(
                    "closing session %s: %s", session.meter.trace_id or "(no trace_id)", reason
                )
                session.splice.close(client_code, CloseCode.GOING_AWAY, reason)
                if outcome == "client_slow":  # it reads nothing, so it would not read a close
                    session.splice.client.transport.abort()

    def _overdue(self, session: _Session, now: float) -> tuple[str, str, int] | None:
        """Why the watchdog closes ``session`` now (outcome, reason, client's close code)."""
        settings, meter = self.settings, session.meter
        gap = settings.upstream_gap_timeout
        stalled = session.splice.client.write_paused_since
        if now - session.opened > settings.max_session_seconds:
            # Even after an ERROR: an upstream may go on streaming (a second START).
            return "timeout", f"session longer than {settings.max_session_seconds:g} s", BAD_GATEWAY
        if meter.state.finished:
            return None
        if (
            meter.start_sent is None
            and now - session.opened > settings.idle_timeout + _START_GRACE_SECONDS
        ):
            return "timeout", "no START from the client", BAD_GATEWAY
        if stalled is not None:  # the upstream is not read meanwhile: not its silence
            if now - stalled <= gap:
                return None
            return "client_slow", f"client not reading for {gap:g} s", CloseCode.POLICY_VIOLATION
        if meter.start_sent is not None and now - session.splice.last_upstream > gap:
            return "timeout", f"upstream silent for {gap:g} s", BAD_GATEWAY
        return None

    def _next_check(self, session: _Session) -> float:
        """The earliest time a rule of :meth:`_overdue` can fire for ``session``.

        Each rule's clock only moves forward: the last upstream message (a stall that starts
        later starts after it too), the start of a stall, the session's opening.
        """
        settings, meter = self.settings, session.meter
        gap = settings.upstream_gap_timeout
        earliest = min(
            session.opened + settings.max_session_seconds, session.splice.last_upstream + gap
        )
        if meter.start_sent is None:
            earliest = min(earliest, session.opened + settings.idle_timeout + _START_GRACE_SECONDS)
        stalled = session.splice.client.write_paused_since
        if stalled is not None:
            earliest = min(earliest, stalled + gap)
        return earliest

    # -- readiness -------------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, str]:
        """Whether this pod can take calls, from the gateway's own state (not the cloud's)."""
        return self._readiness()

    def _readiness(self) -> tuple[bool, str]:
        local = self.backend == "local"
        probe = self.upstream_probe
        return decide(
            ReadinessFacts(
                listening=self.server is not None and self.server.is_serving(),
                draining=self.draining,
                engine=probe.reachable is True if local else None,  # local: the engine's port
                fallback=None
                if self.fallback_probe is None
                else self.fallback_probe.reachable is True,
                secondary=self.settings.secondary_url is not None,
                upstream=None if local else probe.reachable,
                upstream_detail="" if local else probe.detail,
            )
        )

    async def drain(self, server: asyncio.Server, seconds: float) -> None:
        """Stop accepting, let sessions finish for up to ``seconds``, then close the rest."""
        self.draining = True
        server.close()  # stops listening; the connections already open are ours to end
        await self.spares.close()
        try:
            async with asyncio.timeout(seconds):
                await self.wait_idle()
        except TimeoutError:
            logger.warning(
                "%d sessions still active after the %g s drain; closing them",
                self.active_sessions,
                seconds,
            )
        for task in self._opening.values():
            task.cancel()  # the client gets a 503
        for session in self.sessions:
            session.meter.fail("timeout", "draining")  # cut by the shutdown, not by a peer
            session.splice.close(CloseCode.GOING_AWAY, CloseCode.GOING_AWAY, _SHUTTING_DOWN)
        for door in list(self._doors):
            door.reply(_draining())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_GRACE_SECONDS):
                await self.wait_idle()
        for session in self.sessions:
            session.splice.abort()  # unresponsive: nothing left to send
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_GRACE_SECONDS):
                await self.wait_idle()
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        await server.wait_closed()


_last_trim = 0.0


def _trim_free_memory() -> float:
    """Give freed heap back to the OS (glibc only); returns 0, or how long to wait first.

    At most every 10 s: a gateway that is idle between single calls should not pay for it
    after every one. Without it RSS stays at its peak after a burst or an attack.
    """
    global _last_trim  # noqa: PLW0603 (one process-wide heap)
    if _LIBC is None:
        return 0.0
    now = time.monotonic()
    if now - _last_trim < _TRIM_INTERVAL_SECONDS:
        return _last_trim + _TRIM_INTERVAL_SECONDS - now
    _last_trim = now
    _LIBC.malloc_trim(0)
    return 0.0


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC: Final = _load_libc()


class _Slots(asyncio.Semaphore):
    """The upstream handshakes in flight: a semaphore that can also be taken without a wait."""

    def take_now(self) -> bool:
        """Take a slot if one is free and nobody waits for one (as ``acquire`` would at once)."""
        if self.locked():
            return False
        self._value -= 1  # acquire()'s own step when it need not wait (CPython 3.11 to 3.13)
        return True


def _refuse(door: FrontDoor, response: Response) -> None:
    """Answer ``response``; if the 101 went out already, end the client's connection instead.

    The 101 goes out when the upstream accepts; a timeout or shutdown can still end the
    opening in that same loop turn.
    """
    door.reply(response)
    if door.handed_over and door.transport is not None:
        door.transport.abort()


def _internal_error() -> Response:
    """The answer to a client whose session a bug in the gateway broke (the log says which)."""
    return json_response(500, "", "internal error in the gateway; see its log")


def _draining() -> Response:
    """The answer to a client the gateway will not serve because it is shutting down."""
    return json_response(503, "", "gateway is shutting down; connect to another instance")


def _handshake_failure(exc: RttsError) -> tuple[Response, str | int]:
    """The client's answer when the upstream refused or could not be reached.

    A standard 4xx or 5xx refusal is passed on with its status; anything else that is not
    101 (2xx, a redirect, which is never followed, a status HTTP does not define) is 502.
    The body always names the upstream's status.
    """
    if isinstance(exc, HandshakeError) and exc.status:
        status = exc.status if _passed_on(exc.status) else 502
        message = exc.message if status == exc.status else f"HTTP {exc.status} {exc.message}"
        return json_response(
            status,
            exc.error_code,
            f"upstream refused: {message}"[:300],
            upstream_status=exc.status,
        ), exc.error_code or exc.status
    if isinstance(exc, RttsTimeoutError):
        waited = "upstream did not answer" if exc.phase == "connect" else f"no {exc.phase}"
        return json_response(504, "", f"{waited} within {exc.seconds:.3g} s"), "timeout"
    if isinstance(exc, AuthenticationError):
        return json_response(
            502, "", f"gateway could not authenticate upstream: {exc}"[:300]
        ), "network"
    return json_response(502, "", f"upstream unreachable: {exc}"[:300]), "network"


def _passed_on(status: int) -> bool:
    """Whether an upstream's refusal reaches the client with its own status."""
    return 400 <= status <= 599 and status in _STANDARD_STATUSES


_STANDARD_STATUSES: Final = frozenset(status.value for status in HTTPStatus)


def _upstreams(
    settings: GatewaySettings, base: str, auth: HandshakeAuth, local_base: str | None
) -> list[Upstream]:
    """Primary, then the second upstream and the local engine when configured."""
    policy = BreakerPolicy(
        failures=settings.breaker_failures,
        probe_interval=settings.breaker_probe_interval,
        max_probe_interval=settings.breaker_max_probe_interval,
        half_open_sessions=settings.breaker_half_open_sessions,
    )

    def upstream(name: UpstreamName, base: str, auth: HandshakeAuth, **extra: Any) -> Upstream:
        breaker = CircuitBreaker(policy, time.monotonic)
        return Upstream(
            name,
            base,
            auth,
            breaker,
            probe_project=settings.project_id or "probe",
            compiled=settings.relay_path == "compiled",
            **extra,
        )

    if settings.resolved_backend == "local":  # the engine is the primary; "local" = fallback
        return [upstream("primary", base, auth)]
    tls = _tls_context(settings)
    chain = [upstream("primary", base, auth, headers=settings.extra_headers(), ssl=tls)]
    if settings.secondary_url is not None:
        secondary_auth, headers = settings.secondary_auth()
        chain.append(
            upstream(
                "secondary",
                settings.secondary_url.rstrip("/"),
                secondary_auth,
                headers=headers,
                ssl=tls,
                project_id=settings.secondary_project_id,
            )
        )
    if local_base is not None:
        chain.append(upstream("local", local_base, NoAuth()))
    return chain


def _tls_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    if settings.verify_tls and settings.ca_file is None:
        return None  # the default: system CAs, hostname checked (gateway.upstream_socket)
    cafile = str(settings.ca_file) if settings.ca_file else None
    return client_tls(cafile, verify=settings.verify_tls)


@dataclass
class RunningGateway:
    """A gateway that is serving: where it listens, and the objects behind it."""

    gateway: Gateway
    server: asyncio.Server
    host: str
    port: int
    metrics_port: int
    engine: LocalEngine | None = None

    @property
    def backend(self) -> str:
        """``local`` or ``huawei``."""
        return self.gateway.backend

    def url(self, project_id: str = "local") -> str:
        """The rtts URL for a project on this gateway."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/v1/{project_id}/rtts"

    @property
    def metrics_url(self) -> str:
        """Base URL of /metrics, /healthz and /readyz."""
        return f"http://{self.gateway.settings.metrics_host}:{self.metrics_port}"


@asynccontextmanager
async def _local_engine(settings: GatewaySettings) -> AsyncIterator[tuple[str, LocalEngine | None]]:
    """The engine on an internal loopback port (local backend, ``--fallback local``)."""
    if settings.resolved_backend != "local" and settings.fallback != "local":
        yield "", None
        return
    worker = SynthesisWorker(chunk_ms=settings.chunk_ms)
    await worker.start()
    engine = LocalEngine(worker, EngineLimits(idle_timeout=settings.idle_timeout))
    server = await serve(
        engine.handle,
        "127.0.0.1",
        0,
        compression=None,
        max_size=settings.max_message_bytes,
        server_header="rtts-local-engine",
        logger=engine_websockets_logger(),
    )
    try:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", engine
    finally:
        server.close()
        await server.wait_closed()
        worker.close()


@asynccontextmanager
async def url_or_local_engine(url: str | None, project_id: str = "local") -> AsyncIterator[str]:
    """``url`` if given; else a local-engine gateway on a free loopback port, while in use.

    For examples, demos and tests that should run with no cloud account.
    """
    if url:
        yield url
        return
    async with run_gateway(GatewaySettings(port=0, metrics_port=0)) as gateway:
        yield gateway.url(project_id)


@asynccontextmanager
async def run_gateway(settings: GatewaySettings) -> AsyncIterator[RunningGateway]:
    """Start the gateway (and its engine or upstream), yield it while it serves, then drain."""
    async with _local_engine(settings) as (engine_base, engine):
        if settings.resolved_backend == "local":
            gateway = Gateway(settings, engine_base, NoAuth())
        else:
            local = engine_base if engine is not None else None  # --fallback local
            gateway = Gateway(settings, settings.upstream_base, settings.build_auth(), local)
        runner, metrics_port = await start_http(
            build_app(gateway.metrics, gateway.readiness, gateway.failover.describe),
            settings.metrics_host,
            settings.metrics_port,
        )
        reachability = [p for p in (gateway.upstream_probe, gateway.fallback_probe) if p]
        for checked in reachability:  # known before the first /readyz can say ready
            await checked.check()
        try:
            server = await asyncio.get_running_loop().create_server(
                gateway.door, settings.host, settings.port, backlog=_LISTEN_BACKLOG
            )
        except OSError as exc:
            await runner.cleanup()
            raise GatewayError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc} "
                "(choose another with --host/--port, or RTTS_GATEWAY_HOST/_PORT; port 0: any)"
            ) from None
        gateway.server = server
        watchdog = asyncio.create_task(gateway.watchdog())
        probe_tasks = [asyncio.create_task(checked.run()) for checked in reachability]
        spares = asyncio.create_task(gateway.spares.maintain())
        probes = asyncio.create_task(gateway.failover.supervise())
        sockname = server.sockets[0].getsockname()
        try:
            yield RunningGateway(gateway, server, sockname[0], sockname[1], metrics_port, engine)
        finally:
            try:
                await gateway.drain(server, settings.drain_timeout)
            finally:
                watchdog.cancel()
                for task in probe_tasks:
                    task.cancel()
                spares.cancel()
                probes.cancel()
                await runner.cleanup()
