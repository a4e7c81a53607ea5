"""``rtts-gateway``: run the rtts gateway from the command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import re
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final, get_args

from pydantic import ValidationError
from pydantic_settings import CliApp, CliSettingsSource, SettingsError

from gateway.errors import GatewayError
from gateway.metrics import package_version
from gateway.server import run_gateway
from gateway.settings import ENV_PREFIX, GatewaySettings

logger = logging.getLogger("gateway")
_SECRETS = frozenset(
    {
        "token",
        "iam_password",
        "secret_key",
        "gateway_key",
        "secondary_token",
        "secondary_secret_key",
        "secondary_gateway_key",
    }
)


def _in_flags(message: str) -> str:
    """A message of the shared credential rules, with field names as the gateway's flags."""
    names = "|".join(sorted(GatewaySettings.model_fields, key=len, reverse=True))
    # Names with an underscore are unambiguous; a plain word ("region") only where it names
    # a setting: after "needs" or before "must".
    pattern = rf"(?<![\w-])(\w+_\w+)(?!\w)|(?<=needs )({names})(?!\w)|^({names})(?= must)"

    def flag(match: re.Match[str]) -> str:
        name = match[1] or match[2] or match[3]
        return "--" + name.replace("_", "-") if name in GatewaySettings.model_fields else name

    return re.sub(pattern, flag, message)


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        if not item["loc"]:
            lines.append(f"  {_in_flags(message)}")
            continue
        name = str(item["loc"][0])
        flag = "--" + name.replace("_", "-")
        shown = "" if name in _SECRETS or "input" not in item else f" (got {item['input']!r})"
        lines.append(f"  {flag} / {ENV_PREFIX}{name.upper()}: {message}{shown}")
    return "invalid settings:\n" + "\n".join(lines)


def _metavar(name: str, annotation: object) -> str:
    """What a flag's value is, in the user's words (pydantic-settings shows Python types)."""
    if name.endswith(("_timeout", "_seconds")):
        return "SECONDS"
    if name == "port" or name.endswith("_port"):
        return "PORT"
    if name == "host" or name.endswith("_host"):
        return "ADDRESS"
    if name.endswith(("_url", "_endpoint")):
        return "URL"
    if name.endswith("_ids"):
        return "ID,..."
    kinds = set(get_args(annotation)) or {annotation}  # int | None: int
    if int in kinds:
        return "N"
    if float in kinds:
        return "NUMBER"
    if Path in kinds:
        return "FILE"
    return name.upper()


_NO_DEFAULT: Final = " (default: None)"


def _command_line() -> CliSettingsSource[argparse.ArgumentParser]:
    """The ``rtts-gateway`` parser: the settings' flags with readable placeholders; --version."""
    source: CliSettingsSource[argparse.ArgumentParser] = CliSettingsSource(
        GatewaySettings, cli_exit_on_error=False
    )
    parser: argparse.ArgumentParser = source.root_parser
    fields = GatewaySettings.model_fields
    for action in parser._actions:  # argparse offers no public way to edit an argument
        field = fields.get(action.dest)
        # Choices such as {auto,local,huawei} say it all already.
        if field is not None and action.metavar and not str(action.metavar).startswith("{"):
            action.metavar = _metavar(action.dest, field.annotation)
        # An unset option (no region, no token...) has no default worth printing.
        if action.help and action.help.endswith(_NO_DEFAULT):
            action.help = action.help.removesuffix(_NO_DEFAULT)
    parser.add_argument(
        "--version",
        action="version",
        version=f"rtts-gateway {package_version() or 'unknown (not installed)'}",
        help="print the version",
    )
    return source


async def _serve(settings: GatewaySettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with run_gateway(settings) as gateway:
        print(
            f"rtts-gateway listening on {gateway.url('{project_id}')} (backend {gateway.backend}); "
            f"/metrics, /healthz and /readyz on {gateway.metrics_url}",
            flush=True,
        )
        # Everything loaded so far lives as long as the process: keep it out of the garbage
        # collector's full passes, which would otherwise pause every stream (55 ms once, in
        # the capacity benchmark, before this).
        gc.freeze()
        await stop.wait()
        logger.info("stopping: draining up to %g s", settings.drain_timeout)


def _run(coroutine: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run the gateway on uvloop when asked for (or, with 'auto', when it is installed)."""
    if event_loop != "asyncio":
        try:
            import uvloop  # noqa: PLC0415 (optional, chosen at run time)
        except ImportError:
            if event_loop == "uvloop":
                raise GatewayError("--event-loop uvloop: uvloop is not installed") from None
        else:
            uvloop.run(coroutine)
            return
    asyncio.run(coroutine)


def main(argv: list[str] | None = None) -> int:
    """Parse settings from ``argv`` and the environment, then serve until SIGINT/SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    try:
        settings = CliApp.run(GatewaySettings, cli_args=args, cli_settings_source=_command_line())
    except ValidationError as exc:
        print(f"rtts-gateway: {_explain(exc)}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        print(f"rtts-gateway: {exc}; see rtts-gateway --help", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    backend = settings.resolved_backend
    if settings.backend == "auto":
        why = "credentials or an upstream are set" if backend == "huawei" else "no credentials set"
        logger.info("backend %s (auto: %s)", backend, why)
    else:
        logger.info("backend %s", backend)
    logger.info("relay path %s (--relay %s)", settings.relay_path, settings.relay)
    try:
        _run(_serve(settings), settings.event_loop)
    except GatewayError as exc:
        print(f"rtts-gateway: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
