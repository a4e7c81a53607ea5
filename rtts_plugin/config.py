"""Connection settings of the plugin: where to connect, how to authenticate, time limits.

Given as constructor arguments or as ``HUAWEI_RTTS_*`` environment variables (constructor
arguments win). Either a full ``url`` (e.g. a gateway at
``ws://127.0.0.1:8765/v1/{project_id}/rtts``) or ``region`` + ``project_id`` for Huawei
Cloud, which resolves to ``wss://sis-ext.{region}.myhuaweicloud.com/v1/{project_id}/rtts``.
"""

from __future__ import annotations

import re
from typing import Final, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rtts_plugin.auth import AkSkAuth, HandshakeAuth, IamPasswordAuth, NoAuth, StaticTokenAuth
from rtts_plugin.transport import Timeouts

ENV_PREFIX: Final = "HUAWEI_RTTS_"
_REGION: Final = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_PROJECT_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class HuaweiRTTSConnection(BaseSettings):
    """Where and how the plugin connects. Every field has a ``HUAWEI_RTTS_<NAME>`` variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, hide_input_in_errors=True
    )

    url: str | None = Field(None, description="Full rtts URL (ws:// or wss://); wins over region")
    region: str | None = Field(None, description="Huawei Cloud region, e.g. cn-north-4")
    project_id: str | None = Field(None, description="Project ID of that region")
    token: SecretStr | None = Field(None, description="A ready IAM token (X-Auth-Token)")
    iam_username: str | None = Field(None, description="IAM user, to fetch tokens")
    iam_password: SecretStr | None = Field(None, description="IAM user's password")
    iam_domain: str | None = Field(None, description="Account (domain) name of the IAM user")
    iam_endpoint: str | None = Field(None, description="IAM base URL; default iam.{region}...")
    access_key: str | None = Field(None, description="AK, for AK/SK signing")
    secret_key: SecretStr | None = Field(None, description="SK, for AK/SK signing")
    enterprise_project_id: str | None = Field(None, description="Bill to this enterprise project")
    wire_format: Literal["pcm", "ulaw", "alaw"] = Field(
        "pcm", description="Audio on the wire; ulaw/alaw halve the bytes and are decoded locally"
    )
    connect_timeout: float = Field(10.0, gt=0, le=120, description="Seconds for the handshake")
    start_timeout: float = Field(10.0, gt=0, le=120, description="Seconds from START sent to START")
    gap_timeout: float = Field(10.0, gt=0, le=120, description="Longest silence between frames")
    end_timeout: float = Field(60.0, gt=0, le=3600, description="Seconds from START to END")
    max_retries: int = Field(2, ge=0, le=10, description="Retries before the first audio byte")
    retry_backoff: float = Field(
        0.2, ge=0, le=30, description="First retry delay (doubles, jittered)"
    )
    prewarm: bool = Field(False, description="Keep one handshaken connection ready")
    prewarm_max_age: float = Field(
        15.0, gt=0, lt=20, description="Replace the spare connection after this many seconds"
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in ("ws", "wss") or not parts.hostname:
                raise ValueError(
                    "url must be ws://host[:port]/v1/{project_id}/rtts or wss://…, "
                    f"got {self.url!r}"
                )
        else:
            missing = [name for name in ("region", "project_id") if getattr(self, name) is None]
            if missing:
                raise ValueError(
                    "say where to connect: set url (e.g. the gateway "
                    "ws://127.0.0.1:8765/v1/{project_id}/rtts) or both region and project_id "
                    f"({ENV_PREFIX}URL or {ENV_PREFIX}REGION + {ENV_PREFIX}PROJECT_ID); missing: "
                    + ", ".join(missing)
                )
        if self.region is not None and not _REGION.match(self.region):
            raise ValueError(f"region must look like cn-north-4, got {self.region!r}")
        if self.project_id is not None and not _PROJECT_ID.match(self.project_id):
            raise ValueError(f"project_id must be letters, digits, - or _, got {self.project_id!r}")
        schemes = [
            name
            for name, given in (
                ("token", self.token is not None),
                (
                    "IAM password",
                    any(
                        v is not None
                        for v in (self.iam_username, self.iam_password, self.iam_domain)
                    ),
                ),
                ("AK/SK", self.access_key is not None or self.secret_key is not None),
            )
            if given
        ]
        if len(schemes) > 1:
            raise ValueError(f"use one way to authenticate, not {' and '.join(schemes)}")
        if schemes == ["IAM password"] and None in (
            self.iam_username,
            self.iam_password,
            self.iam_domain,
        ):
            raise ValueError("IAM password auth needs iam_username, iam_password and iam_domain")
        if schemes == ["IAM password"] and self.region is None:
            raise ValueError(
                "IAM password auth needs region (tokens are scoped to a region's project)"
            )
        if schemes == ["AK/SK"] and (self.access_key is None or self.secret_key is None):
            raise ValueError("AK/SK auth needs both access_key and secret_key")
        if not schemes and self.url is None:
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
        return f"wss://sis-ext.{self.region}.myhuaweicloud.com/v1/{self.project_id}/rtts"

    @property
    def timeouts(self) -> Timeouts:
        """The per-phase time limits."""
        return Timeouts(
            self.connect_timeout, self.start_timeout, self.gap_timeout, self.end_timeout
        )

    def build_auth(self) -> HandshakeAuth:
        """The handshake authenticator these settings describe."""
        if self.token is not None:
            return StaticTokenAuth(self.token.get_secret_value())
        if (
            self.iam_username is not None
            and self.iam_password is not None
            and self.iam_domain is not None
        ):
            assert self.region is not None
            return IamPasswordAuth(
                username=self.iam_username,
                password=self.iam_password.get_secret_value(),
                domain=self.iam_domain,
                region=self.region,
                project_id=self.project_id,
                iam_endpoint=self.iam_endpoint,
            )
        if self.access_key is not None and self.secret_key is not None:
            return AkSkAuth(self.access_key, self.secret_key.get_secret_value())
        return NoAuth()

    def extra_headers(self) -> dict[str, str]:
        """Headers sent on every handshake besides authentication."""
        if self.enterprise_project_id:
            return {"Enterprise-Project-Id": self.enterprise_project_id}
        return {}
