"""Connection settings of the plugin: where to connect, how to authenticate, time limits.

Given as constructor arguments or as ``HUAWEI_RTTS_*`` environment variables (constructor
arguments win). Either a full ``url`` (e.g. a gateway at
``ws://127.0.0.1:8765/v1/{project_id}/rtts``) or ``region`` + ``project_id`` for Huawei
Cloud, which resolves to ``wss://sis-ext.{region}.myhuaweicloud.com/v1/{project_id}/rtts``.
"""

from __future__ import annotations

from typing import Final, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from rtts_plugin.budget import Timeouts
from rtts_plugin.credentials import CloudCredentials

ENV_PREFIX: Final = "HUAWEI_RTTS_"


class HuaweiRTTSConnection(CloudCredentials):
    """Where and how the plugin connects. Every field has a ``HUAWEI_RTTS_<NAME>`` variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, hide_input_in_errors=True
    )

    url: str | None = Field(None, description="Full rtts URL (ws:// or wss://); wins over region")
    gateway_key: SecretStr | None = Field(
        None, description="Key the gateway asks for (sent as Authorization: Bearer)"
    )
    wire_format: Literal["pcm", "ulaw", "alaw"] = Field(
        "pcm", description="Audio on the wire; ulaw/alaw halve the bytes and are decoded locally"
    )
    first_audio_timeout: float = Field(
        2.5,
        gt=0,
        le=120,
        description="Seconds from the text handed over to its first audio byte, retries included",
    )
    connect_timeout: float = Field(10.0, gt=0, le=120, description="Seconds for the handshake")
    start_timeout: float = Field(10.0, gt=0, le=120, description="Seconds from START sent to START")
    gap_timeout: float = Field(10.0, gt=0, le=120, description="Longest silence between frames")
    end_timeout: float = Field(
        60.0, gt=0, le=3600, description="Seconds from START to END, plus end_timeout_per_char"
    )
    end_timeout_per_char: float = Field(
        0.5, ge=0, le=10, description="Seconds added to end_timeout per character of the text"
    )
    max_retries: int = Field(2, ge=0, le=10, description="Retries before the first audio byte")
    retry_backoff: float = Field(
        0.2, ge=0, le=30, description="First retry delay (doubles, jittered)"
    )
    max_consecutive_failures: int = Field(
        3, ge=1, le=100, description="Failed utterances in a row that make the service unusable"
    )
    probe_interval: float = Field(
        1.0, gt=0, le=60, description="First pause between recovery probes (doubles, jittered)"
    )
    probe_max_interval: float = Field(
        10.0, gt=0, le=600, description="Longest pause between recovery probes"
    )
    prewarm: bool = Field(False, description="Keep one handshaken connection ready")
    prewarm_max_age: float = Field(
        15.0, gt=0, lt=20, description="Replace the spare connection after this many seconds"
    )

    @model_validator(mode="after")
    def _check_where(self) -> Self:
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in ("ws", "wss") or not parts.hostname:
                raise ValueError(
                    "url must be ws://host[:port]/v1/{project_id}/rtts or wss://…, "
                    f"got {self.url!r}"
                )
            if self.gateway_key is not None and "AK/SK" in self.credential_schemes():
                raise ValueError("gateway_key and AK/SK signing both use Authorization; pick one")
            return self
        missing = [name for name in ("region", "project_id") if getattr(self, name) is None]
        if missing:
            raise ValueError(
                "say where to connect: set url (e.g. the gateway "
                "ws://127.0.0.1:8765/v1/{project_id}/rtts) or both region and project_id "
                f"({ENV_PREFIX}URL or {ENV_PREFIX}REGION + {ENV_PREFIX}PROJECT_ID); missing: "
                + ", ".join(missing)
            )
        if not self.has_credentials:
            raise ValueError(
                "connecting to Huawei Cloud needs credentials: a token, an IAM user "
                "(iam_username, iam_password, iam_domain) or access_key + secret_key"
            )
        return self

    @property
    def resolved_url(self) -> str:
        """The URL to connect to."""
        if self.url is not None:
            return self.url
        assert self.project_id is not None
        return self.cloud_url(self.project_id)

    @property
    def timeouts(self) -> Timeouts:
        """The per-phase time limits."""
        return Timeouts(
            connect=self.connect_timeout,
            start=self.start_timeout,
            gap=self.gap_timeout,
            end=self.end_timeout,
            first_audio=self.first_audio_timeout,
            end_per_char=self.end_timeout_per_char,
        )

    def extra_headers(self) -> dict[str, str]:
        """Headers sent on every handshake besides Huawei authentication."""
        headers = super().extra_headers()
        if self.gateway_key is not None:
            headers["Authorization"] = f"Bearer {self.gateway_key.get_secret_value()}"
        return headers
