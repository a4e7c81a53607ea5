"""Where a session's upstream comes from: the primary, a second upstream, the local engine.

Each upstream has its own :class:`~gateway.breaker.CircuitBreaker`. A new session tries
them in order (primary, then ``--secondary-url``, then the local engine with
``--fallback local``), skipping any whose breaker is open, and takes the first whose
handshake succeeds. A counted failure (refused, timed out, 5xx, a 2xx or 3xx instead of the
upgrade, quota) moves on to the next one within the same connect budget. When every breaker
is open the caller gets a 503 at once, with ``Retry-After`` and a JSON body naming the
cause. All of this happens before the client's 101, so before any audio byte: a session that
has started is never moved, and the breakers never touch a session in progress.
The client's URL never changes.

While a breaker is open, :meth:`Failover.supervise` probes its upstream with the handshake
alone (no START, so nothing is billed), with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from ssl import SSLContext
from typing import Final, Literal

from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeaderValue, InvalidURI
from websockets.http11 import Response
from websockets.uri import WebSocketURI, parse_uri

from gateway.addresses import ADDRESSES, Address
from gateway.breaker import (
    OVERLOAD_CODES,
    CircuitBreaker,
    State,
    Ticket,
    Transition,
    failure_cause,
)
from gateway.dial import Dial, Preconnect
from gateway.errors import HandshakesBusy, detached
from gateway.frontdoor import SERVER_HEADER
from gateway.meter import SessionMeter
from gateway.metrics import GatewayMetrics
from gateway.upgrade import upgrade_request
from gateway.upstream_socket import (
    UpstreamSocket,
    hello_made_ahead,
    open_upstream,
    prepare_hello,
    proxy_for,
)
from rtts_plugin.auth import HandshakeAuth
from rtts_plugin.errors import RttsError
from rtts_plugin.transport import with_renewal

logger = logging.getLogger(__name__)

# primary: Huawei Cloud or --upstream-url (or the engine, on a local backend); secondary:
# --secondary-url; local: the engine as --fallback local.
UpstreamName = Literal["primary", "secondary", "local"]
UPSTREAM_NAMES: Final[tuple[UpstreamName, ...]] = ("primary", "secondary", "local")
# After a failed attempt, the next upstream gets what is left of the connect budget, but at
# least this: a timed-out primary must not leave the local engine no time at all.
FAILOVER_FLOOR_SECONDS: Final = 1.0


@functools.lru_cache(maxsize=16)  # on every caller's path, for the same few URLs
def _parsed(url: str) -> WebSocketURI:
    return parse_uri(url)


@dataclass(eq=False)
class Upstream:
    """One place sessions can be relayed to, with its credentials and its breaker."""

    name: UpstreamName
    base: str
    """ws:// or wss://host[:port]; ``/v1/{project_id}/rtts`` is appended."""
    auth: HandshakeAuth = field(repr=False)
    breaker: CircuitBreaker
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    ssl: SSLContext | None = field(default=None, repr=False)
    project_id: str | None = None
    """The project to use upstream (another region's); ``None``: the client's."""
    probe_project: str = "probe"
    """Whose URL a probe opens: the last project served (or the configured one)."""
    compiled: bool = False
    """Read a TLS upstream's records in C (the relay's compiled path, ``--relay``)."""

    def url(self, project_id: str) -> str:
        """The upstream URL for a client's project."""
        return f"{self.base}/v1/{self.project_id or project_id}/rtts"

    def prepare(self) -> None:
        """Make the next connection's ClientHello now (a TLS upstream; else nothing).

        Called once a session is past its first audio, so that the key exchange is not
        made on the next caller's path (:meth:`~gateway.upstream_socket.ResumingTLS.prepare`).
        """
        if self._tls_host is not None:
            prepare_hello(self._tls_host, self.ssl)

    @functools.cached_property
    def _tls_host(self) -> str | None:
        """The host a wss upstream's TLS names (None for ws)."""
        uri = self._base_uri
        return uri.host if uri.secure else None

    @property
    def _base_uri(self) -> WebSocketURI:
        return _parsed(self.base)  # ``base`` may change (tests point an upstream elsewhere)

    def address(self) -> Address | None:
        """The one address a connection to this upstream goes to now, with nothing to wait for.

        ``None`` when the usual path has to find it: the host's addresses are not known or
        are several (raced), a proxy is in the way, or it is an IPv6 address with a zone
        (which a plain address tuple drops).
        """
        uri = self._base_uri
        addresses = ADDRESSES.known(uri.host, uri.port)
        if addresses is None or len(addresses) != 1 or "%" in addresses[0][0]:
            return None
        return addresses[0] if proxy_for(uri) is None else None

    def dial(
        self,
        project_id: str,
        release: Callable[[], None],
        preconnect: Preconnect | None = None,
    ) -> Dial | None:
        """Start ``project_id``'s connection now, if nothing needs waiting for (gateway.dial).

        ``release`` gives back the handshake slot the caller took for it; ``preconnect``: the
        caller's TCP connect started when it connected, taken if it can be used. ``None``
        when the usual path has to open it: the credentials must be fetched, the address
        is not one to connect to at once (:meth:`address`), or the request or the socket
        cannot be made (the usual path then says why).
        """
        url = self.url(project_id)
        auth = self.auth.ready_headers(url)
        if auth is None:
            return None
        headers = {**self.headers, **auth}
        try:
            uri, request, key = upgrade_request(url, headers)
        except (InvalidURI, InvalidHeaderValue):
            return None
        address = self.address()
        if address is None:
            return None
        hello = hello_made_ahead(uri.host, self.ssl) if uri.secure else None
        try:
            return Dial(  # closes its socket, the preconnected one too, if it cannot start
                uri,
                address,
                request=request,
                key=key,
                headers=headers,
                release=release,
                hello=hello,
                preconnected=preconnect.take(address) if preconnect is not None else None,
            )
        except OSError:  # no socket to be had (out of descriptors): the usual path reports it
            return None

    async def connect(
        self,
        project_id: str,
        seconds: float,
        on_open: Callable[[], None] | None = None,
        dialed: Dial | None = None,
    ) -> UpstreamSocket:
        """Open (handshake only) a connection for ``project_id``; the splice takes it over.

        ``on_open``: called the moment the upstream accepts (see
        :func:`~gateway.upstream_socket.open_upstream`). ``dialed``: the connection
        :meth:`dial` started, taken over by the first attempt.
        """
        url = self.url(project_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds  # credentials (an IAM token) and handshake alike

        def attempt(auth: Mapping[str, str]) -> Awaitable[UpstreamSocket]:
            nonlocal dialed
            first, dialed = dialed, None  # a retry (credentials renewed) opens anew
            return open_upstream(
                url,
                first.headers if first is not None else {**self.headers, **auth},
                connect_timeout=max(deadline - loop.time(), 0.001),
                ssl=self.ssl,
                on_open=on_open,
                compiled=self.compiled,
                dialed=first,
            )

        return await with_renewal(url, self.auth, attempt, within=seconds)


class Lease:
    """A session on an upstream: settles the breaker's ticket once, with the verdict."""

    def __init__(self, upstream: Upstream, ticket: Ticket) -> None:
        self.upstream = upstream
        self._ticket: Ticket | None = ticket

    @property
    def settled(self) -> bool:
        """The verdict is recorded (nothing the session does later changes it)."""
        return self._ticket is None

    def settle(self, ok: bool | None, cause: str = "") -> None:
        """Record the session's verdict on its upstream (only the first call counts)."""
        if self._ticket is not None:
            ticket, self._ticket = self._ticket, None
            self.upstream.breaker.settle(ticket, ok, cause)

    def watch(self, meter: SessionMeter, *, final: bool = False) -> None:
        """Settle from what the session did so far, once it says something.

        Audio or END is a success, a quota error (SIS.0312, APIG.0308) a failure; at the
        end (``final``) anything else says nothing about the upstream.
        """
        if self._ticket is None:
            return
        if isinstance(meter.code, str) and meter.code in OVERLOAD_CODES:
            self.settle(False, meter.code)
        elif meter.first_audio is not None or meter.ended is not None:
            self.settle(True)
        elif final:
            self.settle(None)


@dataclass(frozen=True)
class Opened:
    """A session's upstream connection and the lease on its upstream."""

    connection: UpstreamSocket
    lease: Lease


@dataclass(frozen=True)
class AllOpen:
    """Every upstream's breaker is open: the caller is refused at once."""

    retry_after: int
    causes: dict[str, str]

    def response(self) -> Response:
        """503 with ``Retry-After`` and a JSON body naming the cause."""
        named = ", ".join(f"{name} ({cause})" for name, cause in self.causes.items())
        body = json.dumps(
            {
                "error_code": "",
                "error_msg": f"upstream unavailable: circuit open for {named}; "
                f"retry after {self.retry_after} s",
                "cause": "circuit_open",
                "upstreams": self.causes,
                "retry_after": self.retry_after,
            }
        ).encode()
        headers = Headers(
            {
                "Server": SERVER_HEADER,
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
                "Connection": "close",
                "Retry-After": str(self.retry_after),
            }
        )
        return Response(503, HTTPStatus(503).phrase, headers, body)


# How a session's connection is opened on an upstream within a timeout (the gateway adds
# its spares and its limit on handshakes in flight).
Opener = Callable[[Upstream, float], Awaitable[UpstreamSocket]]


class Failover:
    """The ordered upstreams of a gateway, their breakers, probes and metrics."""

    def __init__(
        self,
        upstreams: list[Upstream],
        metrics: GatewayMetrics,
        connect_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstreams = upstreams
        self._metrics = metrics
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._wake = asyncio.Event()
        backend = metrics.backend
        for upstream in upstreams:
            name = upstream.name
            metrics.breaker_state.labels(backend, name).set(upstream.breaker.state)
            metrics.upstream_sessions.labels(backend, name)
            for state in State:
                metrics.breaker_transitions.labels(backend, name, state.label)
            for result in ("ok", "failed"):
                metrics.breaker_probes.labels(backend, name, result)
            upstream.breaker.on_transition = self._listener(upstream)
        metrics.refused_fast.labels(backend)

    @property
    def primary(self) -> Upstream:
        """The first upstream (Huawei Cloud, --upstream-url, or the engine of a local backend)."""
        return self.upstreams[0]

    async def open(
        self, project_id: str, opener: Opener
    ) -> Opened | AllOpen | RttsError | HandshakesBusy:
        """The first upstream whose breaker admits the session and whose handshake succeeds.

        Returns the error of the last attempt if none succeeded (:class:`HandshakesBusy` if
        the only ones were the gateway's own refusals to start a handshake, which tell no
        breaker anything and move on to the next upstream), or :class:`AllOpen` if no breaker
        admitted the session at all.
        """
        began = self._clock()
        error: RttsError | None = None
        busy: HandshakesBusy | None = None
        for upstream in self.upstreams:
            ticket = upstream.breaker.admit()
            if ticket is None:
                continue
            timeout = self._connect_timeout - (self._clock() - began)
            if error is not None:
                timeout = max(timeout, FAILOVER_FLOOR_SECONDS)
            upstream.probe_project = project_id
            lease = Lease(upstream, ticket)
            try:
                connection = await opener(upstream, timeout)
            # An error kept to be returned is detached: this frame, in its traceback, holds it.
            except HandshakesBusy as exc:  # the upstream was not asked: no verdict
                lease.settle(None)
                busy = detached(exc)
                continue
            except RttsError as exc:
                cause = failure_cause(exc)
                lease.settle(False if cause else None, cause or "")
                if error is None or cause is not None:
                    error = detached(exc)
                logger.warning(
                    "upstream %s handshake failed for project %s: %s",
                    upstream.name,
                    project_id,
                    exc,
                )
                if cause is None:
                    break  # the upstream answered: the request itself was refused
                continue
            except BaseException:
                lease.settle(None)  # cancelled (shutdown) or a bug: no verdict
                raise
            self._metrics.upstream_sessions.labels(self._metrics.backend, upstream.name).inc()
            return Opened(connection, lease)
        if error is not None:
            return error
        if busy is not None:
            return busy
        self._metrics.refused_fast.labels(self._metrics.backend).inc()
        return AllOpen(self._retry_after(), self._causes())

    def describe(self) -> dict[str, dict[str, object]]:
        """Each upstream's breaker, for ``/readyz``."""
        now = self._clock()
        described: dict[str, dict[str, object]] = {}
        for upstream in self.upstreams:
            breaker = upstream.breaker
            entry: dict[str, object] = {
                "state": breaker.state.label,
                "for_s": round(now - breaker.since, 3),
                "consecutive_failures": breaker.consecutive,
            }
            if breaker.last_cause:
                entry["last_failure"] = breaker.last_cause
            probe_in = breaker.probe_in()
            if probe_in is not None:
                entry["next_probe_in_s"] = round(probe_in, 3)
                entry["probe_interval_s"] = breaker.probe_wait
            described[upstream.name] = entry
        return described

    async def supervise(self) -> None:
        """Probe every upstream whose breaker is open, when its probe is due (runs forever)."""
        async with asyncio.TaskGroup() as group:
            for upstream in self.upstreams:
                group.create_task(self._probe_loop(upstream))

    async def _probe_loop(self, upstream: Upstream) -> None:
        breaker = upstream.breaker
        while True:
            self._wake.clear()
            due = breaker.probe_in()
            if due is None or due > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due):
                        await self._wake.wait()
                continue
            ok, cause = await self._probe(upstream)
            self._metrics.breaker_probes.labels(
                self._metrics.backend, upstream.name, "ok" if ok else "failed"
            ).inc()
            breaker.probed(ok, cause)

    async def _probe(self, upstream: Upstream) -> tuple[bool, str]:
        """The handshake alone, then a close: the upstream answers, and nothing is billed."""
        try:
            connection = await upstream.connect(upstream.probe_project, self._connect_timeout)
        except RttsError as exc:
            cause = failure_cause(exc)
            logger.info("probe of upstream %s: %s", upstream.name, exc)
            return cause is None, cause or ""  # any answer but overload is an upstream alive
        except Exception:  # a bug must not end the probing: the breaker would stay open
            logger.exception("probe of upstream %s failed in the gateway", upstream.name)
            return False, "probe error"
        connection.retire("probe")
        return True, ""

    def _listener(self, upstream: Upstream) -> Callable[[Transition], None]:
        metrics, backend, name = self._metrics, self._metrics.backend, upstream.name

        def transition(change: Transition) -> None:
            metrics.breaker_state.labels(backend, name).set(change.new)
            metrics.breaker_transitions.labels(backend, name, change.new.label).inc()
            level = logging.WARNING if change.new is State.OPEN else logging.INFO
            probe = "" if change.probe_in is None else f"; probe in {change.probe_in:g} s"
            logger.log(
                level,
                "upstream %s circuit %s -> %s (%s%s)",
                name,
                change.old.label,
                change.new.label,
                change.cause,
                probe,
            )
            self._wake.set()  # a probe loop may have a new deadline

        return transition

    def _retry_after(self) -> int:
        waits = [u.breaker.probe_in() for u in self.upstreams]
        known = [wait for wait in waits if wait is not None]
        return max(1, math.ceil(min(known))) if known else 1

    def _causes(self) -> dict[str, str]:
        return {u.name: u.breaker.last_cause or u.breaker.state.label for u in self._open()}

    def _open(self) -> Iterator[Upstream]:
        return (u for u in self.upstreams if u.breaker.state is not State.CLOSED)
