"""Huawei Cloud location and credential settings shared by the plugin and the gateway.

Both :class:`~rtts_plugin.config.HuaweiRTTSConnection` (``HUAWEI_RTTS_*``) and the gateway's
settings (``RTTS_GATEWAY_*``) inherit these fields and rules, so both accept the same
credentials, check them the same way and build the same authenticator.
"""

from __future__ import annotations

import re
from typing import Final, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

from rtts_plugin.auth import AkSkAuth, HandshakeAuth, IamPasswordAuth, NoAuth, StaticTokenAuth

_REGION: Final = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
PROJECT_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""A project ID as Huawei's URLs carry it (``fullmatch``)."""


class CloudCredentials(BaseSettings):
    """Where in Huawei Cloud, and how to authenticate there (at most one way)."""

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

    @model_validator(mode="after")
    def _check_credentials(self) -> Self:
        if self.region is not None and not _REGION.match(self.region):
            raise ValueError(f"region must look like cn-north-4, got {self.region!r}")
        if self.project_id is not None and not PROJECT_ID.fullmatch(self.project_id):
            raise ValueError(f"project_id must be letters, digits, - or _, got {self.project_id!r}")
        schemes = self.credential_schemes()
        if len(schemes) > 1:
            raise ValueError(f"use one way to authenticate, not {' and '.join(schemes)}")
        iam = (self.iam_username, self.iam_password, self.iam_domain)
        if schemes == ["IAM password"] and None in iam:
            raise ValueError("IAM password auth needs iam_username, iam_password and iam_domain")
        if schemes == ["IAM password"] and self.region is None:
            raise ValueError("IAM password auth needs region (tokens are scoped to a region)")
        if schemes == ["AK/SK"] and (self.access_key is None or self.secret_key is None):
            raise ValueError("AK/SK auth needs both access_key and secret_key")
        return self

    def credential_schemes(self) -> list[str]:
        """The authentication schemes with at least one field set."""
        given = {
            "token": self.token is not None,
            "IAM password": any(
                value is not None
                for value in (self.iam_username, self.iam_password, self.iam_domain)
            ),
            "AK/SK": self.access_key is not None or self.secret_key is not None,
        }
        return [name for name, present in given.items() if present]

    @property
    def has_credentials(self) -> bool:
        """True if a way to authenticate to Huawei Cloud is configured."""
        return bool(self.credential_schemes())

    def build_auth(self) -> HandshakeAuth:
        """The handshake authenticator these settings describe (:class:`NoAuth` if none)."""
        if self.token is not None:
            return StaticTokenAuth(self.token.get_secret_value())
        if self.iam_username and self.iam_password and self.iam_domain and self.region:
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

    def cloud_url(self, project_id: str) -> str:
        """Huawei Cloud's rtts URL for ``project_id`` in the configured region."""
        return f"wss://sis-ext.{self.region}.myhuaweicloud.com/v1/{project_id}/rtts"
