"""Shared fixtures: a real gateway on the local engine, on 127.0.0.1 with an OS-chosen port."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable

import pytest
import uvloop
from hypothesis import settings

from gateway.server import RunningGateway, run_gateway
from gateway.settings import GatewaySettings

# Deterministic examples in CI; HYPOTHESIS_PROFILE=explore draws fresh ones each run.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
async def gateway() -> AsyncIterator[RunningGateway]:
    async with run_gateway(
        GatewaySettings(port=0, metrics_port=0, idle_timeout=2.0, drain_timeout=1.0)
    ) as running:
        yield running


# The modules that exercise the relay run on both event loops the gateway runs on.
_BOTH_LOOPS = {
    "test_gateway",
    "test_faults",
    "test_splice",
    "test_failover",
    "test_hardening",
    "test_upstream_socket",
    "test_upstream_tls",
    "test_fastpath",
    "test_dial",
    "test_preconnect",
    "test_session_garbage",
}


@pytest.fixture(autouse=True)
def _relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay's modules run the compiled path on uvloop (production's pair) and the
    pure-Python path on asyncio's loop, so every relay test passes on both paths."""
    callspec = getattr(request.node, "callspec", None)
    if request.module.__name__.rpartition(".")[2] not in _BOTH_LOOPS or callspec is None:
        return
    compiled = "uvloop" in callspec.id.split("-")
    # Gateways read it at start, in this process and in the ones the tests spawn.
    monkeypatch.setenv("RTTS_GATEWAY_RELAY", "compiled" if compiled else "python")


@pytest.fixture
def compiled(request: pytest.FixtureRequest) -> bool:
    """Whether a relay test that builds the relay's parts itself runs the compiled path: on
    uvloop, as ``_relay_path`` chooses for the gateways the tests start."""
    callspec = getattr(request.node, "callspec", None)
    return callspec is not None and "uvloop" in callspec.id.split("-")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """asyncio and uvloop for the relay's tests; asyncio for the rest."""
    module = getattr(item, "module", None)
    if module is not None and module.__name__.rpartition(".")[2] in _BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
