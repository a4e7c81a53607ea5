"""Upstream host names are resolved once for a while, not on every session's path."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from gateway.addresses import ADDRESS_TTL_SECONDS, ADDRESSES, AddressCache
from gateway.upstream_socket import open_upstream
from rtts_plugin.errors import RttsTimeoutError
from tests.support import unanswered_port
from tests.test_upstream_socket import accepting, listening


class Resolver:
    """Answers every name with two addresses and counts the lookups."""

    def __init__(self) -> None:
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        self.lookups.append(host)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),  # once is enough
        ]


async def test_a_name_is_looked_up_once_per_ttl_and_again_once_forgotten() -> None:
    now = [100.0]
    resolver = Resolver()
    cache = AddressCache(clock=lambda: now[0], lookup=resolver)
    expected = [("127.0.0.2", 443), ("127.0.0.1", 443)]
    assert await cache.resolve("rtts.example", 443) == expected
    now[0] += ADDRESS_TTL_SECONDS - 1
    assert await cache.resolve("rtts.example", 443) == expected
    assert resolver.lookups == ["rtts.example"]
    now[0] += 1  # the answer has expired
    await cache.resolve("rtts.example", 443)
    cache.forget("rtts.example", 443)  # none of its addresses answered
    await cache.resolve("rtts.example", 443)
    assert resolver.lookups == ["rtts.example"] * 3


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_an_ip_literal_is_never_looked_up(host: str) -> None:
    resolver = Resolver()
    assert await AddressCache(lookup=resolver).resolve(host, 80) == [(host, 80)]
    assert resolver.lookups == []


async def test_the_upstream_is_reached_by_name_on_the_address_that_answers() -> None:
    # "localhost" may come first as ::1, where nothing listens: the next address is tried.
    async with listening(accepting(b"")) as port:
        for _ in range(2):
            upstream = await open_upstream(
                f"ws://localhost:{port}/v1/p/rtts", {}, connect_timeout=5
            )
            assert upstream.usable()
            upstream.abort()
    with pytest.raises(Exception, match="cannot connect to localhost"):
        await asyncio.wait_for(
            open_upstream(f"ws://localhost:{port}/v1/p/rtts", {}, connect_timeout=5), 10
        )


@asynccontextmanager
async def dead_and_live() -> AsyncIterator[int]:
    """A port where 127.0.0.2 drops connection attempts, as a firewall or a dead node does
    (its accept queue is full), and 127.0.0.1 accepts the upgrade."""
    with unanswered_port() as port:
        async with await asyncio.start_server(accepting(b""), "127.0.0.1", port):
            yield port


def answering(monkeypatch: pytest.MonkeyPatch, *answers: list[str]) -> list[str]:
    """The gateway's resolver gives ``answers`` in turn (the last one from then on)."""
    lookups: list[str] = []

    async def lookup(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        lookups.append(host)
        addresses = answers[min(len(lookups), len(answers)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    monkeypatch.setattr(ADDRESSES, "_lookup", lookup)
    monkeypatch.setattr(ADDRESSES, "_known", {})
    return lookups


async def test_an_address_that_drops_connection_attempts_costs_the_next_one_a_moment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two addresses, the first dead: it is raced, not waited out for the whole connect
    timeout, and the live one goes first from then on."""
    async with dead_and_live() as port:
        lookups = answering(monkeypatch, ["127.0.0.2", "127.0.0.1"])
        for _ in range(2):
            upstream = await open_upstream(
                f"ws://rtts.test:{port}/v1/p/rtts", {}, connect_timeout=5
            )
            assert upstream.usable()
            upstream.abort()
        assert await ADDRESSES.resolve("rtts.test", port) == [
            ("127.0.0.1", port),
            ("127.0.0.2", port),
        ]
    assert lookups == ["rtts.test"]


async def test_a_name_whose_address_stopped_answering_is_resolved_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The name moved off a dead address: the session that timed out on it has the next one
    look the name up again instead of using the dead answer for the rest of its TTL."""
    async with dead_and_live() as port:
        lookups = answering(monkeypatch, ["127.0.0.2"], ["127.0.0.1"])
        url = f"ws://rtts.test:{port}/v1/p/rtts"
        with pytest.raises(RttsTimeoutError):
            await open_upstream(url, {}, connect_timeout=0.5)
        upstream = await open_upstream(url, {}, connect_timeout=5)
        assert upstream.usable()
        upstream.abort()
    assert lookups == ["rtts.test", "rtts.test"]
