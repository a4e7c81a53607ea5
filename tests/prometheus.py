"""A real Prometheus (Debian's ``prometheus`` package) started by a test on a free loopback port."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp


def require(tool: str) -> str:
    """The path of ``tool``; a clear failure (never a skip) if it is not installed."""
    path = shutil.which(tool)
    assert path, (
        f"{tool} is not installed: run scripts/test.sh (it installs Debian's prometheus package)"
    )
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Prometheus:
    """Query helper for a running Prometheus."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def query(self, promql: str) -> list[dict[str, object]]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.url}/api/v1/query", params={"query": promql}) as response,
        ):
            body = await response.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    async def scalar(self, promql: str) -> float | None:
        result = await self.query(promql)
        return float(result[0]["value"][1]) if result else None  # type: ignore[index]

    async def wait_for(self, promql: str, expected: float, timeout: float = 30.0) -> float | None:
        """Poll until ``promql`` evaluates to ``expected`` (or the timeout); returns the last value."""
        deadline = asyncio.get_running_loop().time() + timeout
        last = None
        while asyncio.get_running_loop().time() < deadline:
            last = await self.scalar(promql)
            if last == expected:
                return last
            await asyncio.sleep(0.25)
        return last


@asynccontextmanager
async def running_prometheus(
    tmp_path: Path, targets: list[str], rule_files: list[Path] | None = None
) -> AsyncIterator[Prometheus]:
    """Prometheus scraping ``targets`` (host:port) every 250 ms, with optional rule files."""
    binary = require("prometheus")
    config = tmp_path / "prometheus.yml"
    rules = "".join(f"\n  - {path}" for path in rule_files or [])
    config.write_text(
        "global:\n  scrape_interval: 250ms\n  evaluation_interval: 250ms\n"
        + (f"rule_files:{rules}\n" if rules else "")
        + "scrape_configs:\n  - job_name: rtts-gateway\n    static_configs:\n      - targets: ["
        + ", ".join(f"'{t}'" for t in targets)
        + "]\n"
    )
    port = free_port()
    process = subprocess.Popen(  # noqa: ASYNC220 (a long-lived child, waited for below)
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    prometheus = Prometheus(f"http://127.0.0.1:{port}")
    try:
        ready = False
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    async with http.get(f"{prometheus.url}/-/ready") as response:
                        if response.status == 200:
                            ready = True
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        assert ready, (
            "Prometheus did not become ready: " + (tmp_path / "prometheus.log").read_text()
        )
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
