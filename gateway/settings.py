"""Gateway settings, from CLI flags (``--kebab-case``) and ``RTTS_GATEWAY_*`` variables.

Flags win over environment variables, which win over defaults. Every value is validated at
start-up, and a bad one stops the gateway with a message naming the flag, the variable, the
value and what is allowed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "RTTS_GATEWAY_"


class GatewaySettings(BaseSettings):
    """Sidecar gateway for Huawei Cloud real-time TTS (rtts), speaking the rtts protocol.

    Every flag can also be set as an environment variable: RTTS_GATEWAY_ + the flag name in
    upper case with underscores (e.g. RTTS_GATEWAY_PORT=9000).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        cli_prog_name="rtts-gateway",
        cli_kebab_case=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_implicit_flags=True,
    )

    backend: Literal["local"] = Field(
        "local",
        description="Where speech comes from. 'local': the embedded espeak-ng engine "
        "(no cloud account needed).",
    )
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address to listen on. The default accepts only local clients; use "
        "0.0.0.0 to accept any.",
    )
    port: int = Field(
        8765, ge=0, le=65535, description="TCP port to listen on; 0 lets the OS choose a free one."
    )
    idle_timeout: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="Seconds a client may stay connected without sending START before it "
        "gets FATAL_ERROR SIS.0304 (the cloud uses about 20).",
    )
    max_sessions: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Concurrent sessions served; more get ERROR SIS.0312.",
    )
    max_message_bytes: int = Field(
        256 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest client message accepted; larger ones close the connection "
        "with code 1009. 10000 characters of Chinese fit in 64 KiB.",
    )
    chunk_ms: int = Field(
        60, ge=10, le=1000, description="Audio per binary frame from the local engine, in ms."
    )
    drain_timeout: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="On SIGTERM or Ctrl-C, seconds to let sessions in progress finish "
        "before closing them.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Logging threshold."
    )
