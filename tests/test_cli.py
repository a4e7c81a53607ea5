"""``rtts-gateway`` as a real process: flags, environment, errors, serving, and SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from unittest.mock import ANY

import pytest
from websockets.asyncio.client import connect

from gateway.settings import GatewaySettings
from tests.support import exchange, start

COMMAND = [sys.executable, "-m", "gateway.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


@asynccontextmanager
async def gateway_process(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        match = re.search(r"listening on (ws://127\.0\.0\.1:\d+)/v1/\{project_id\}/rtts", line)
        assert match, f"unexpected first line: {line!r}"
        yield process, match[1]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_help_documents_every_setting() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in (
        "--backend",
        "--host",
        "--port",
        "--idle-timeout",
        "--max-sessions",
        "--max-message-bytes",
        "--chunk-ms",
        "--drain-timeout",
        "--log-level",
    ):
        assert flag in result.stdout
    assert "RTTS_GATEWAY_" in result.stdout
    # Placeholders say what to give, not which Python type holds it.
    placeholders = set(re.findall(r"--[a-z-]+ ([^\s\]]+)", result.stdout))
    assert not placeholders & {"str", "int", "float", "bool", "SecretStr", "Path"}, placeholders
    assert {"SECONDS", "PORT", "URL", "TOKEN", "N"} <= placeholders
    assert "--token TOKEN" in result.stdout and "--version" in result.stdout
    # Unset options print no default; set ones print theirs.
    assert "(default: None)" not in result.stdout
    assert "(default: 8765)" in result.stdout


def test_version_prints_the_installed_version() -> None:
    from importlib import metadata

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"rtts-gateway {metadata.version('huawei-rtts-pipecat')}"


@pytest.mark.parametrize(
    ("args", "env", "fragments"),
    [
        (
            ["--port", "70000"],
            {},
            ["--port / RTTS_GATEWAY_PORT", "less than or equal to 65535", "70000"],
        ),
        (["--idle-timeout", "-1"], {}, ["--idle-timeout", "greater than 0"]),
        (["--backend", "cloud"], {}, ["--backend", "'cloud'"]),
        (["--no-such-flag"], {}, ["unrecognized arguments: --no-such-flag", "--help"]),
        (
            [],
            {"RTTS_GATEWAY_MAX_SESSIONS": "many"},
            ["--max-sessions / RTTS_GATEWAY_MAX_SESSIONS", "'many'"],
        ),
    ],
)
def test_bad_settings_stop_with_a_precise_message(
    args: list[str], env: dict[str, str], fragments: list[str]
) -> None:
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_port_in_use_is_a_clear_error() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_cli("--port", port)
        metrics = run_cli("--port", "0", "--metrics-port", port)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--host/--port" in result.stderr and "Traceback" not in result.stderr
    # The metrics port names its own flag and variable.
    assert metrics.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} for /metrics" in metrics.stderr
    assert (
        "--metrics-port" in metrics.stderr and "RTTS_GATEWAY_METRICS_HOST/_PORT" in metrics.stderr
    )


async def test_serves_then_drains_on_sigterm() -> None:
    async with gateway_process("--drain-timeout", "20", env={"RTTS_GATEWAY_IDLE_TIMEOUT": "5"}) as (
        process,
        base,
    ):
        url = f"{base}/v1/project/rtts"
        assert (await exchange(url, start("Hello from a real process."))).kinds == [
            "START",
            "AUDIO",
            "END",
        ]
        # A long session in flight when SIGTERM arrives still completes.
        async with connect(url, compression=None, proxy=None, max_size=None) as ws:
            await ws.send(
                start("This keeps going for a while. " * 200, property="english_amy_common")
            )
            assert json.loads(await ws.recv())["resp_type"] == "START"
            assert isinstance(await ws.recv(), bytes)
            process.send_signal(signal.SIGTERM)
            rest = [frame async for frame in ws]
        assert json.loads(rest[-1]) == {"resp_type": "END", "trace_id": ANY, "reason": "NORMAL"}
        assert ws.close_code == 1000
        assert await asyncio.wait_for(process.wait(), 30) == 0
        # and it stopped listening
        with pytest.raises(OSError):
            await exchange(url, start("anyone?"))


def test_backend_auto_picks_huawei_only_with_credentials_or_an_upstream() -> None:
    from gateway.settings import GatewaySettings

    assert GatewaySettings().resolved_backend == "local"
    assert GatewaySettings(region="cn-north-4", token="t").resolved_backend == "huawei"
    assert GatewaySettings(upstream_url="ws://127.0.0.1:9").resolved_backend == "huawei"
    assert (
        GatewaySettings(backend="local", token="t", region="cn-north-4").resolved_backend == "local"
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--backend", "huawei"],
            "the huawei backend needs --region / RTTS_GATEWAY_REGION (or --upstream-url / "
            "RTTS_GATEWAY_UPSTREAM_URL for another gateway)",
        ),
        (
            ["--backend", "huawei", "--region", "cn-north-4"],
            "the huawei backend needs credentials: --token, an IAM user (--iam-username",
        ),
        (
            ["--upstream-url", "http://x"],
            "--upstream-url / RTTS_GATEWAY_UPSTREAM_URL must be ws://host[:port]",
        ),
        (["--token", "t", "--access-key", "a", "--secret-key", "s"], "one way to authenticate"),
        # The rules shared with the plugin name the gateway's flags, not the field names.
        (["--iam-username", "u", "--region", "cn-north-4"], "needs --iam-username, --iam-password"),
        (["--access-key", "a", "--region", "cn-north-4"], "both --access-key and --secret-key"),
        (["--region", "north", "--token", "t"], "--region must look like cn-north-4"),
        (["--metrics-port", "-1"], "--metrics-port"),
    ],
)
def test_backend_settings_are_checked(args: list[str], fragment: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2 and fragment in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"upstream_url": "ws://up:abc"}, "with a port from 1 to 65535, got 'ws://up:abc'"),
        ({"upstream_url": "ws://up:70000"}, "with a port from 1 to 65535"),
        ({"upstream_url": "ws://up:0"}, "with a port from 1 to 65535"),
        (
            {"upstream_url": "wss://up/v1/p/rtts"},
            "the base only: /v1/{project_id}/rtts is appended",
        ),
        ({"upstream_url": "wss://up/#x"}, "without a query or fragment"),
        (
            {"upstream_url": "ws://up", "secondary_url": "ws://down:abc"},
            "--secondary-url / RTTS_GATEWAY_SECONDARY_URL must be ws://host[:port] or "
            "wss://host[:port], with a port from 1 to 65535",
        ),
        ({"gateway_key": ""}, "--gateway-key / RTTS_GATEWAY_GATEWAY_KEY is empty"),
        ({"gateway_key": " \n"}, "--gateway-key / RTTS_GATEWAY_GATEWAY_KEY is empty"),
        ({"gateway_key": "two words"}, "printable ASCII without blanks"),
        (
            {"upstream_url": "ws://up", "secondary_url": "ws://down", "secondary_gateway_key": "ü"},
            "--secondary-gateway-key / RTTS_GATEWAY_SECONDARY_GATEWAY_KEY must be printable",
        ),
        ({"allowed_project_ids": " , "}, "lists no project id, so no caller could be served"),
        ({"allowed_project_ids": "alpha,项目"}, "has a bad project id '项目': 1 to 128 ASCII"),
    ],
)
def test_settings_no_request_could_pass_are_refused_at_start(
    fields: dict[str, str], fragment: str
) -> None:
    """A value that would fail every session, or open the gateway, stops it instead."""
    with pytest.raises(ValueError, match=re.escape(fragment)):
        GatewaySettings(**fields)  # type: ignore[arg-type]


def test_a_bad_upstream_port_stops_the_process_with_exit_2() -> None:
    result = run_cli("--upstream-url", "ws://up:abc")  # once a traceback and exit 1
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "with a port from 1 to 65535" in result.stderr


def test_secret_values_are_never_echoed() -> None:
    result = run_cli("--token", "tok-Secret-5", "--access-key", "ak", "--secret-key", "sk-Secret-6")
    assert result.returncode == 2
    assert "tok-Secret-5" not in result.stderr and "sk-Secret-6" not in result.stderr
    for fields in (
        {"gateway_key": "key Secret-7"},
        {"upstream_url": "wss://user:pw-Secret-8@up"},
    ):
        with pytest.raises(ValueError) as refused:
            GatewaySettings(**fields)  # type: ignore[arg-type]
        assert "Secret" not in str(refused.value)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_serves_on_either_event_loop(loop: str) -> None:
    async with gateway_process("--event-loop", loop) as (process, base):
        assert (await exchange(f"{base}/v1/p/rtts", start("Hello."))).kinds == [
            "START",
            "AUDIO",
            "END",
        ]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
