"""The upstream's addresses, resolved once per host for a while, not once per session.

Every session opens its own upstream connection. Resolving the host each time costs a
thread-pool round trip and DNS queries on the caller's path (in Kubernetes, with its
search domains, several per name). nginx resolves a ``proxy_pass`` host once, at start;
here an answer is kept for :data:`ADDRESS_TTL_SECONDS`, and dropped at once when none of
its addresses can be connected to, so a moved upstream is looked up again by the next
session. IP literals are never looked up.

A name with several addresses is connected to as Happy Eyeballs does (RFC 8305,
:func:`first_to_answer`): the next address is tried when the one before has failed or not
answered within :data:`NEXT_ADDRESS_DELAY`, so an address that drops connection attempts (a
firewall, a dead node) costs a session that delay, not its whole connect timeout; the one
that answered goes first for the next sessions.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

ADDRESS_TTL_SECONDS: Final = 30.0
"""How long a host's resolved addresses are used before it is resolved again."""
NEXT_ADDRESS_DELAY: Final = 0.25
"""Seconds an address has to answer before the next one is tried too (RFC 8305's 250 ms)."""
_MAX_HOSTS: Final = 64  # a gateway talks to a handful of upstream hosts

Address = tuple[str, int]
# loop.getaddrinfo's shape: (host, port, type=...) -> [(family, type, proto, name, sockaddr)]
Lookup = Callable[..., Awaitable[list[tuple[Any, ...]]]]


@functools.lru_cache(maxsize=_MAX_HOSTS)
def is_ip_literal(host: str) -> bool:
    """True for an IPv4 or IPv6 address (nothing to resolve)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AddressCache:
    """Resolved (host, port) pairs, each kept for :data:`ADDRESS_TTL_SECONDS`."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, lookup: Lookup | None = None
    ) -> None:
        self._clock = clock
        self._lookup = lookup  # default: the running loop's getaddrinfo
        self._known: dict[Address, tuple[float, list[Address]]] = {}

    async def resolve(self, host: str, port: int) -> list[Address]:
        """The addresses to connect to for ``host``, in the resolver's order.

        Raises:
            OSError: the name does not resolve (``socket.gaierror``).
        """
        known = self.known(host, port)
        if known is not None:
            return known
        now = self._clock()
        lookup = self._lookup or asyncio.get_running_loop().getaddrinfo
        found = await lookup(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys((str(info[4][0]), port) for info in found))
        if len(self._known) >= _MAX_HOSTS:
            self._known.clear()
        self._known[(host, port)] = (now, addresses)
        return addresses

    def known(self, host: str, port: int) -> list[Address] | None:
        """What :meth:`resolve` would return now without a lookup, else ``None``."""
        if is_ip_literal(host):
            return [(host, port)]
        known = self._known.get((host, port))
        if known is not None and self._clock() - known[0] < ADDRESS_TTL_SECONDS:
            return known[1]
        return None

    def prefer(self, host: str, port: int, address: Address) -> None:
        """``address`` answered where the ones before it did not: try it first from now on."""
        known = self._known.get((host, port))
        if known is not None and address in known[1]:
            known[1].remove(address)
            known[1].insert(0, address)

    def forget(self, host: str, port: int) -> None:
        """None of the addresses answered: resolve ``host`` again next time."""
        self._known.pop((host, port), None)


ADDRESSES: Final = AddressCache()
"""The gateway's cache (one process, one set of upstream hosts)."""


def family_of(address: Address) -> int:
    """The address family of a resolved ``address`` (an IPv6 one has a colon)."""
    return socket.AF_INET6 if ":" in address[0] else socket.AF_INET


def tcp_socket(family: int) -> socket.socket:
    """A non-blocking TCP socket with Nagle off, for a connection a transport takes over.

    The relay writes small frames; asyncio's transport turns Nagle off only on a socket made
    with IPPROTO_TCP (uvloop always does), so it is done here.
    """
    made = socket.socket(family, socket.SOCK_STREAM)
    made.setblocking(False)
    made.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return made


async def first_to_answer(
    addresses: list[Address], delay: float = NEXT_ADDRESS_DELAY
) -> tuple[socket.socket, Address]:
    """A socket connected to the first of ``addresses`` to answer, and that address.

    Attempts start in order, each ``delay`` after the one before or as soon as it fails; the
    first connected wins and the others are closed.

    Raises:
        OSError: every address refused or was unreachable (the last one's error).
    """
    loop = asyncio.get_running_loop()
    waiting = list(addresses)
    attempts: dict[asyncio.Task[None], tuple[socket.socket, Address]] = {}
    error: OSError | None = None
    try:
        while waiting or attempts:
            if waiting:
                address = waiting.pop(0)
                sock = tcp_socket(family_of(address))
                attempts[loop.create_task(loop.sock_connect(sock, address))] = (sock, address)
            done, _ = await asyncio.wait(
                attempts, timeout=delay if waiting else None, return_when=asyncio.FIRST_COMPLETED
            )
            for attempt in done:
                sock, address = attempts.pop(attempt)
                failure = attempt.exception()
                if failure is None:
                    return sock, address
                sock.close()
                error = failure if isinstance(failure, OSError) else OSError(str(failure))
    finally:
        for attempt, (sock, _) in attempts.items():
            attempt.cancel()
            sock.close()
    assert error is not None  # a resolved name has an address
    raise error
