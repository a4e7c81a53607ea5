"""A session's upstream connection, started from the callback that admits the session.

Without spares, what a caller waits for is mostly the upstream's handshake, and the
gateway's own work is on that path only until its upgrade request is on the wire: the
upstream cannot answer before. So when nothing needs waiting for or deciding first (the
primary upstream's breaker is closed, a handshake slot is free, no spare is there to take,
the credentials are in hand, the address is known and no proxy is in the way), the session's
connection is started the moment its request is admitted: the TCP connect and, on a ws://
upstream, the upgrade request itself go out before the session's meter, task, lease and
timers are made, and the session's task adopts the connection
(:func:`~gateway.upstream_socket.open_upstream` with ``dialed``), with the same timeout, checks
and errors as a connection it opens itself. It is the same first attempt on the same
upstream, with the same handshake slot, only made earlier; anything else (a spare, a
failover, an IAM token to fetch, several addresses to race) takes the usual path.

The TCP connect itself can start earlier still: a caller connects, then takes a while to
send its request (about 0.2 ms for a Python client on loopback; far longer across a
network), and in that time a :class:`Preconnect` to the same address is under way. Nothing
is sent on it until the request is admitted and a :class:`Dial` takes it; a caller who is
refused or leaves closes it unused, and :class:`PreconnectBudget` keeps such waste bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final, Literal, get_args

from websockets.uri import WebSocketURI

from gateway.addresses import NEXT_ADDRESS_DELAY, Address, family_of, tcp_socket
from gateway.upstream_tls import StartedHandshake

# One unconnected socket per address family, made for the next dial off a caller's path
# (making one is a fifth of what a dial costs before its request is out).
_NEXT_SOCKET: dict[int, socket.socket] = {}
PRECONNECT_MAX_AGE_SECONDS: Final = 1.0
"""A preconnect older than this when its request comes is closed, not used: an upstream may
drop a connection that sends nothing, and a caller that slow gains nothing from it."""
PRECONNECT_CREDIT: Final = 32
"""Preconnects that may be made before any is earned back (see :class:`PreconnectBudget`)."""
PreconnectOutcome = Literal["used", "replaced", "unused"]
PRECONNECT_OUTCOMES: Final[tuple[PreconnectOutcome, ...]] = get_args(PreconnectOutcome)
"""What becomes of a preconnect: taken by its session's dial, taken but not usable (a fresh
connect made instead), or closed untaken (see :class:`Preconnect`)."""


def _connect_started(sock: socket.socket, address: Address) -> int:
    """Start connecting ``sock`` to ``address``: 0 if under way or done, else the error."""
    try:
        failed = sock.connect_ex(address)
    except OSError as exc:  # an address the family cannot take: fails as a connect would
        failed = exc.errno or errno.EINVAL
    return 0 if failed == errno.EINPROGRESS else failed


def _usable(sock: socket.socket, age: float) -> bool:
    """Whether a request may go out on a preconnect's ``sock``, ``age`` s after it started.

    Not if the connect failed or the peer closed it since (an upstream that restarted, or
    drops a connection that sends nothing), nor if it sent anything (an upstream speaks
    second). One still connecting only while it is younger than Happy Eyeballs' delay:
    after that its SYN was most likely lost, and is resent only a second after it left,
    where a fresh connect's goes out now. One peek tells all of that on the usual path.
    """
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:  # nothing from the peer: connected, or still connecting
        if age < NEXT_ADDRESS_DELAY:
            return True
        try:
            sock.getpeername()
        except OSError:  # still connecting
            return False
        return True
    except OSError:  # refused or reset
        return False
    return False  # b"": the peer closed it; bytes: no upstream sends before the request


def _fresh_socket(family: int) -> socket.socket:
    return _NEXT_SOCKET.pop(family, None) or tcp_socket(family)


class PreconnectBudget:
    """How many preconnects may be started now, so that callers cannot make them for nothing.

    Each one started spends a credit; each session admitted earns one back (up to
    :data:`PRECONNECT_CREDIT`). So however many callers connect and send nothing, or are
    refused, the upstream sees at most that many connections that carried no session, plus
    one per session admitted.
    """

    def __init__(self, credit: int = PRECONNECT_CREDIT) -> None:
        self.limit = credit
        self.credit = credit

    def spend(self) -> bool:
        """Whether a preconnect may start now (its credit is spent)."""
        if self.credit <= 0:
            return False
        self.credit -= 1
        return True

    def earn(self) -> None:
        """A session was admitted: one more preconnect may be made."""
        if self.credit < self.limit:
            self.credit += 1


class Preconnect:
    """A TCP connect to the primary upstream, started when a caller connected.

    It only connects: no byte is written on it, and no event loop watches it, until a
    :class:`Dial` takes it (:meth:`take`). :meth:`close` ends it, taken or not, and reports
    what became of it (a taken one once its request is out, off the caller's path).
    """

    def __init__(
        self, address: Address, ended: Callable[[PreconnectOutcome], object] | None = None
    ) -> None:
        """Start connecting to ``address``; ``ended`` hears what became of it, once.

        Raises:
            OSError: no socket to be had, or the connect failed at once.
        """
        self.address = address
        self._ended = ended
        self._taken = False
        self.started = time.monotonic()
        sock = _fresh_socket(family_of(address))
        failed = _connect_started(sock, address)
        if failed:
            sock.close()
            raise OSError(failed, os.strerror(failed))
        self._socket: socket.socket | None = sock

    def take(self, address: Address) -> socket.socket | None:
        """The socket, connected or connecting to ``address``, or ``None`` (then closed).

        ``None`` if it is not one to use: another address by now, older than
        :data:`PRECONNECT_MAX_AGE_SECONDS`, or not usable now (:func:`_usable`).
        """
        sock, self._socket = self._socket, None
        if sock is None:
            return None
        age = time.monotonic() - self.started
        if address != self.address or age > PRECONNECT_MAX_AGE_SECONDS or not _usable(sock, age):
            sock.close()
            self._end("replaced")
            return None
        self._taken = True  # reported by close(), once the request is out
        return sock

    def close(self) -> None:
        """Close the socket unless a dial took it (idempotent); the end of the preconnect."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
            self._end("unused")
        elif self._taken:
            self._end("used")

    def _end(self, outcome: PreconnectOutcome) -> None:
        ended, self._ended = self._ended, None
        if ended is not None:
            ended(outcome)


class Dial:
    """One upstream connection under way: connected (or connecting), its request sent.

    It holds a handshake slot (``release`` gives it back) and its socket until
    :meth:`adopt`; :meth:`discard` closes a dial nobody adopted. Both release the slot once.
    """

    def __init__(
        self,
        uri: WebSocketURI,
        address: Address,
        *,
        request: bytes,
        key: str,
        headers: Mapping[str, str],
        release: Callable[[], None],
        hello: StartedHandshake | None = None,
        preconnected: socket.socket | None = None,
    ) -> None:
        """Start connecting to ``address``, and send what can go out once connected.

        On ws:// that is ``request``; on wss:// ``hello``'s ClientHello, made ahead, if there
        is one (the TLS layer that takes the connection over carries on from it).
        ``preconnected``: a socket already connecting to ``address`` (:meth:`Preconnect.take`).
        """
        self.uri = uri
        self.address = address
        self.request = request
        self.key = key
        self.headers = headers
        """What the request carries (for the redaction of a refusal's message)."""
        self.hello = hello
        self.started = time.monotonic()
        if not uri.secure:
            self.first = request
        else:
            self.first = hello.outgoing.read() if hello is not None else b""
        """What goes out the moment the connect is done (the request, or a ClientHello)."""
        self.sent = 0
        """Bytes of :attr:`first` written."""
        self._release: Callable[[], None] | None = release
        self._loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[None] = self._loop.create_future()
        """Done once connected and the request (ws://) sent; an ``OSError`` if that failed."""
        self._family = family_of(address)
        self._watching = False
        sock = preconnected if preconnected is not None else _fresh_socket(self._family)
        self._socket: socket.socket | None = sock
        try:
            failed = 0 if preconnected is not None else _connect_started(sock, address)
            if failed:
                self._fail(failed)
            else:
                self._send()  # on loopback the connect is done already; else EAGAIN, we wait
        except BaseException:  # (add_writer refused, a bug): a dial not made holds no socket
            self._unwatch(sock)
            self._socket = None
            sock.close()
            raise

    def adopt(self) -> socket.socket:
        """The connected socket, for a transport to take over (once :attr:`connected`).

        The next dial's socket is made now, while this one's upstream answers.
        """
        sock, self._socket = self._socket, None
        assert sock is not None and self.connected.done() and not self._watching
        if self._family not in _NEXT_SOCKET:
            with contextlib.suppress(OSError):  # out of descriptors: the next dial makes one
                _NEXT_SOCKET[self._family] = tcp_socket(self._family)
        return sock

    def release_slot(self) -> None:
        """Give the handshake slot back (once; later calls do nothing)."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def discard(self, *_: object) -> None:
        """Close the socket if nobody adopted it, and give the slot back (idempotent)."""
        sock, self._socket = self._socket, None
        if sock is not None:
            self._unwatch(sock)
            sock.close()
        if not self.connected.done():
            self.connected.cancel()
        elif not self.connected.cancelled():
            self.connected.exception()  # a failure nobody waited for is not an error to log
        self.release_slot()

    @property
    def request_sent(self) -> int:
        """Bytes of :attr:`request` written (none on wss://: it goes through TLS)."""
        return 0 if self.uri.secure else self.sent

    def _send(self) -> None:
        sock = self._socket
        assert sock is not None
        try:
            # With nothing to send, a zero-length send still says whether the connect is done.
            self.sent += sock.send(self.first[self.sent :])
        except BlockingIOError:  # still connecting (or a full buffer): wait until writable
            self._watch(sock)
            return
        except OSError as exc:
            self._unwatch(sock)
            self._fail(exc.errno or errno.ECONNREFUSED)
            return
        if self.sent < len(self.first):
            self._watch(sock)  # the rest once there is room
            return
        self._unwatch(sock)
        if not self.connected.done():
            self.connected.set_result(None)

    def _writable(self) -> None:
        sock = self._socket
        if sock is None:
            return
        failed = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if failed:
            self._unwatch(sock)
            self._fail(failed)
        else:
            self._send()

    def _watch(self, sock: socket.socket) -> None:
        if not self._watching:
            self._watching = True
            self._loop.add_writer(sock.fileno(), self._writable)

    def _unwatch(self, sock: socket.socket) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_writer(sock.fileno())

    def _fail(self, code: int) -> None:
        if not self.connected.done():
            self.connected.set_exception(OSError(code, os.strerror(code)))
