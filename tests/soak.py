"""Soak: many concurrent sessions through the gateway to the local engine, nothing lost.

    bash scripts/soak.sh                          # 500 sessions at once for 60 s
    bash scripts/soak.sh --sessions 100 --seconds 10

Starts ``rtts-gateway --backend local`` as its own process. Each of ``--sessions`` callers
speaks one utterance after another for ``--seconds``. For every session the SHA-256 of the
audio the caller received must equal the one the engine logged for that trace_id; any
error is a failure; and afterwards the gateway's open file descriptors must be back to
their level before the load and its memory (RSS) within a bound of it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from tests.support import listening_base

_REQUESTS = [
    {
        "text": "Thank you for calling. How can I help you today?",
        "config": {"property": "english_amy_common", "sample_rate": "16000"},
    },
    {
        "text": "您好，欢迎致电客服中心。",
        "config": {
            "property": "chinese_huaxiaomei_common",
            "sample_rate": "8000",
            "subtitle": "word_level",
        },
    },
    {
        "text": "Your order has shipped.",
        "config": {
            "property": "english_alvin_common",
            "audio_format": "ulaw",
            "sample_rate": "8000",
        },
    },
    {
        "text": "请按一号键。",
        "config": {
            "property": "chinese_xiaoyu_common",
            "audio_format": "alaw",
            "sample_rate": "16000",
        },
    },
]
RSS_BOUND_MIB = 64.0


@dataclass
class Report:
    """What the soak saw."""

    sessions: int = 0
    audio_bytes: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    fds_before: int = 0
    fds_after: int = 0
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_after_mib: float = 0.0

    @property
    def ok(self) -> bool:
        """No mismatch, no error, descriptors back, memory within the bound."""
        return (
            self.sessions > 0
            and not self.mismatches
            and not self.errors
            and self.fds_after <= self.fds_before
            and self.rss_after_mib - self.rss_before_mib <= RSS_BOUND_MIB
        )

    def lines(self) -> list[str]:
        """A human summary."""
        return [
            f"sessions          {self.sessions} ({self.audio_bytes / 1e6:.1f} MB of audio)",
            f"digest mismatches {len(self.mismatches)}",
            f"errors            {sum(self.errors.values())} {dict(self.errors) or ''}",
            f"open fds          {self.fds_before} before, {self.fds_after} after",
            f"gateway RSS       {self.rss_before_mib:.1f} MiB before, {self.rss_peak_mib:.1f} peak, {self.rss_after_mib:.1f} after (bound +{RSS_BOUND_MIB:g})",
            "PASS" if self.ok else "FAIL",
        ]


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]


async def _session(
    url: str, request: dict[str, object], received: dict[str, tuple[str, int]], report: Report
) -> None:
    digest, size, trace_id = hashlib.sha256(), 0, ""
    try:
        async with connect(url, compression=None, proxy=None, max_size=None, open_timeout=30) as ws:
            await ws.send(json.dumps({"command": "START", **request}))
            async for message in ws:
                if isinstance(message, bytes):
                    digest.update(message)
                    size += len(message)
                    continue
                body = json.loads(message)
                trace_id = trace_id or body.get("trace_id", "")
                if body["resp_type"] in ("ERROR", "FATAL_ERROR"):
                    report.errors[body.get("error_code", "?")] += 1
            if ws.close_code != 1000:
                report.errors[f"close {ws.close_code}"] += 1
    except (OSError, WebSocketException, TimeoutError) as exc:
        report.errors[type(exc).__name__] += 1
        return
    received[trace_id] = (digest.hexdigest(), size)
    report.sessions += 1
    report.audio_bytes += size


async def soak(sessions: int, seconds: float, *, log: Path) -> Report:
    """Run the soak against a fresh gateway process; returns the report."""
    report = Report()
    with log.open("w") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "--backend",
            "local",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--max-sessions",
            str(sessions + 50),
            "--log-level",
            "INFO",
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
        )
        try:
            base = await listening_base(process)
            url = f"{base}/v1/soak/rtts"
            received: dict[str, tuple[str, int]] = {}
            warmup = Report()
            await asyncio.gather(*(_session(url, _REQUESTS[i % 4], {}, warmup) for i in range(8)))
            await asyncio.sleep(0.5)
            report.fds_before, report.rss_before_mib = _fds(process.pid), _rss_mib(process.pid)
            deadline = time.monotonic() + seconds
            chooser = random.Random(7)

            async def caller() -> None:
                while time.monotonic() < deadline:
                    await _session(url, chooser.choice(_REQUESTS), received, report)
                    report.rss_peak_mib = max(report.rss_peak_mib, _rss_mib(process.pid))

            await asyncio.gather(*(caller() for _ in range(sessions)))
            await asyncio.sleep(2.0)  # let the last sockets close
            report.fds_after, report.rss_after_mib = _fds(process.pid), _rss_mib(process.pid)
        finally:
            process.terminate()
            await process.wait()
    engine = {}
    for entry in (await asyncio.to_thread(log.read_text)).splitlines():
        if '"event": "engine_session"' in entry:
            record = json.loads(entry[entry.index("{") :])
            engine[record["trace_id"]] = (record["audio_sha256"], record["audio_bytes"])
    for trace_id, (digest, size) in received.items():
        if engine.get(trace_id) != (digest, size):
            report.mismatches.append(
                f"{trace_id}: got {size} bytes {digest[:12]}, engine sent {engine.get(trace_id)}"
            )
    return report


def main() -> int:
    """Run the soak from the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sessions", type=int, default=500, help="concurrent callers (default 500)"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long (default 60)")
    parser.add_argument(
        "--log", type=Path, default=Path("out/soak-gateway.log"), help="gateway log file"
    )
    args = parser.parse_args()
    if args.sessions < 1 or args.seconds <= 0:
        parser.error("--sessions must be at least 1 and --seconds positive")
    args.log.parent.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(soak(args.sessions, args.seconds, log=args.log))
    print("\n".join(report.lines()))
    for mismatch in report.mismatches[:10]:
        print(f"  mismatch {mismatch}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
