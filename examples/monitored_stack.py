"""The monitored stack on loopback: gateway (local engine) + real Prometheus + traffic.

    bash scripts/stack.sh                 # runs until Ctrl-C
    bash scripts/stack.sh --duration 60   # or for a minute

Starts ``rtts-gateway --backend local``, a Prometheus (Debian's ``prometheus`` package)
scraping it every 5 s with the alert rules in ``grafana/alerts.yml``, and a traffic generator
speaking a mix of texts (with a few bad requests, so errors show). It prints where
everything is, and on Ctrl-C (or after ``--duration``) stops them all, leaving no process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import suppress
from pathlib import Path

import aiohttp

from gateway.traffic import BAD_EVERY, generate

ROOT = Path(__file__).resolve().parents[1]


def _tied_to_us(argv: list[str]) -> list[str]:
    """``argv`` run so that it gets SIGTERM if this script dies, even by SIGKILL.

    util-linux's ``setpriv --pdeathsig`` sets that up in the child without a ``preexec_fn``
    (which is unsafe once threads exist); where it is missing, Ctrl-C still stops everything.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)"
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="gateway port (default 8765; 0: any)"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=8766, help="gateway metrics port (default 8766; 0: any)"
    )
    parser.add_argument(
        "--prometheus-port", type=int, default=9090, help="Prometheus port (default 9090; 0: any)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=3, help="simultaneous callers (default 3)"
    )
    parser.add_argument(
        "--scrape-interval", type=float, default=5.0, help="Prometheus scrape seconds (default 5)"
    )
    args = parser.parse_args(argv)
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be a positive number of seconds")
    if not 0.1 <= args.scrape_interval <= 60:
        parser.error("--scrape-interval must be from 0.1 to 60 seconds")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


async def _wait_ready(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    # Each probe is short: something else on the port may accept and never answer.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        for _ in range(300):
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with status {process.returncode}")
            with suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} did not become ready at {url}")


def _last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1] if lines else "no output"


async def start_gateway(
    args: argparse.Namespace, workdir: Path
) -> tuple[subprocess.Popen[bytes], str, str]:
    """``rtts-gateway --backend local``; returns it, its ws:// base and its metrics URL."""
    log = workdir / "gateway.log"
    gateway = subprocess.Popen(  # noqa: ASYNC220 (a long-lived child, stopped by run())
        _tied_to_us(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "--backend",
                "local",
                "--port",
                str(args.port),
                "--metrics-port",
                str(args.metrics_port),
                "--log-level",
                "WARNING",
            ]
        ),
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        cwd=ROOT,
    )
    assert gateway.stdout is not None
    line = (await asyncio.to_thread(gateway.stdout.readline)).decode()
    found = re.search(r"listening on (ws://\S+)/v1/\{project_id\}/rtts .* on (http://\S+)", line)
    if not found:
        gateway.kill()
        gateway.wait()
        raise RuntimeError(
            f"rtts-gateway did not start: {line.strip() or _last_line(log)}\n"
            f"  if port {args.port} or {args.metrics_port} is taken, choose others with "
            "--port and --metrics-port (0: any free port)"
        )
    await _wait_ready(f"{found[2]}/readyz", gateway, "rtts-gateway")
    return gateway, found[1], found[2]


async def start_prometheus(
    args: argparse.Namespace, binary: str, metrics: str, workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """Prometheus scraping ``metrics`` with our alert rules; returns it and its URL."""
    port = args.prometheus_port or _free_port()
    interval = round(args.scrape_interval * 1000)
    config = workdir / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {interval}ms\n  evaluation_interval: {interval}ms\n"
        f"rule_files:\n  - {ROOT / 'grafana' / 'alerts.yml'}\n"
        "scrape_configs:\n  - job_name: rtts-gateway\n    static_configs:\n"
        f"      - targets: ['{metrics.removeprefix('http://')}']\n"
    )
    process = subprocess.Popen(  # noqa: ASYNC220 (a long-lived child, stopped by run())
        _tied_to_us(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ]
        ),
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(f"{url}/-/ready", process, "prometheus")
    except RuntimeError as exc:
        raise RuntimeError(
            f"{exc}: {_last_line(workdir / 'prometheus.log')}\n"
            f"  if port {port} is taken, choose another with --prometheus-port (0: any free port)"
        ) from None
    return process, url


async def run(args: argparse.Namespace) -> int:
    """Start everything, generate traffic until stopped, then stop everything."""
    binary = shutil.which("prometheus")
    if binary is None:
        print("monitored_stack: prometheus is not installed; run scripts/stack.sh", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    children: list[subprocess.Popen[bytes]] = []
    workdir = Path(tempfile.mkdtemp(prefix="rtts-stack-"))
    try:
        gateway, gateway_base, metrics = await start_gateway(args, workdir)
        children.append(gateway)
        prometheus, prometheus_url = await start_prometheus(args, binary, metrics, workdir)
        children.append(prometheus)
        dashboard = ROOT / "grafana" / "dashboards" / "rtts-gateway.json"
        print(f"gateway     {gateway_base}/v1/{{project_id}}/rtts   (pid {gateway.pid})")
        print(f"metrics     {metrics}/metrics   health {metrics}/healthz   ready {metrics}/readyz")
        print(
            f"prometheus  {prometheus_url}   (pid {prometheus.pid}; alerts {prometheus_url}/alerts)"
        )
        print("try         sum by (outcome) (rate(rtts_sessions_total[1m]))")
        print(f"dashboard   import {dashboard} into a Grafana using {prometheus_url}")
        print(
            f"alerts      one request in {BAD_EVERY} is deliberately bad, so RttsHighErrorRatio "
            "(errors > 5% for 5 min) fires after 5 minutes: expected here"
        )
        until = f" (or after {args.duration:g} s)" if args.duration else ""
        print(f"traffic     running; Ctrl-C stops everything{until}", flush=True)
        traffic = asyncio.create_task(
            generate(f"{gateway_base}/v1/demo/rtts", concurrency=args.concurrency)
        )
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=args.duration)
        traffic.cancel()
        with suppress(asyncio.CancelledError):
            await traffic
        return 0
    except RuntimeError as exc:
        print(f"monitored_stack: {exc}", file=sys.stderr)
        return 1
    finally:
        await _stop(children)
        shutil.rmtree(workdir, ignore_errors=True)
        print("stopped: gateway and prometheus have exited", flush=True)


async def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            await asyncio.to_thread(child.wait, 15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(asyncio.run(run(arguments())))
