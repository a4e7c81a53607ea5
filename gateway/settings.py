"""Gateway settings, from CLI flags (``--kebab-case``) and ``RTTS_GATEWAY_*`` variables.

Flags win over environment variables, which win over defaults. Every value is validated at
start-up, and a bad one stops the gateway with a message naming the flag, the variable, the
value and what is allowed. Credentials (token, IAM user, AK/SK) are the same fields, with
the same rules, as the plugin's (:class:`~rtts_plugin.credentials.CloudCredentials`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from gateway import fastpath
from rtts_plugin.auth import AkSkAuth, HandshakeAuth, NoAuth, StaticTokenAuth
from rtts_plugin.credentials import PROJECT_ID, CloudCredentials

ENV_PREFIX: Final = "RTTS_GATEWAY_"


def _named(field: str) -> str:
    """How a user sets ``field``: its flag and its environment variable."""
    return f"--{field.replace('_', '-')} / {ENV_PREFIX}{field.upper()}"


def _check_upstream_url(field: str, url: str) -> None:
    """``url`` is a usable upstream base URL: ws(s)://host[:port][/prefix], nothing else.

    Raises:
        ValueError: naming the setting and the rule (the URL is quoted unless it may hold
            credentials).
    """
    rule = f"{_named(field)} must be ws://host[:port] or wss://host[:port]"
    parts = urlsplit(url)
    if "@" in parts.netloc:  # user:password@host: never echoed, never sent
        raise ValueError(f"{rule}, without user or password in it (the URL is not shown)")
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"{rule}, got {url!r}")
    try:
        port = parts.port
    except ValueError:  # not a number, or over 65535
        port = 0
    if port == 0:
        raise ValueError(f"{rule}, with a port from 1 to 65535, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"{rule}, without a query or fragment, got {url!r}")
    if re.search(r"/v1/|/rtts/?$", parts.path):
        raise ValueError(f"{rule}, the base only: /v1/{{project_id}}/rtts is appended, got {url!r}")


class GatewaySettings(CloudCredentials):
    """Sidecar gateway for Huawei Cloud real-time TTS (rtts), speaking the rtts protocol.

    Every flag can also be set as an environment variable: RTTS_GATEWAY_ + the flag name in
    upper case with underscores (e.g. RTTS_GATEWAY_PORT=9000).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
        cli_prog_name="rtts-gateway",
        cli_kebab_case=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_implicit_flags=True,
    )

    backend: Literal["auto", "local", "huawei"] = Field(
        "auto",
        description="Where speech comes from: 'huawei' relays to Huawei Cloud (or "
        "--upstream-url), 'local' is the embedded espeak-ng engine (no cloud account), "
        "'auto' picks huawei when credentials or --upstream-url are set, else local.",
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
    metrics_host: str = Field(
        "127.0.0.1", min_length=1, description="Address of /metrics, /healthz and /readyz."
    )
    metrics_port: int = Field(
        8766, ge=0, le=65535, description="Port of /metrics, /healthz and /readyz; 0: OS chooses."
    )
    upstream_url: str | None = Field(
        None,
        description="Upstream base URL (ws:// or wss://host[:port]) instead of Huawei Cloud's "
        "wss://sis-ext.{region}.myhuaweicloud.com, e.g. another gateway; /v1/{project_id}/rtts "
        "is appended.",
    )
    allowed_project_ids: str | None = Field(
        None,
        description="Comma-separated project IDs clients may use; default: only --project-id "
        "when set, else any.",
    )
    gateway_key: SecretStr | None = Field(
        None, description="If set, clients must send 'Authorization: Bearer <key>' (else 401)."
    )
    verify_tls: bool = Field(True, description="Verify the upstream's TLS certificate.")
    ca_file: Path | None = Field(
        None, description="PEM bundle of CAs to trust upstream, instead of the system's."
    )
    idle_timeout: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="Seconds a client may stay connected without sending START before it "
        "gets FATAL_ERROR SIS.0304 (the cloud uses about 20).",
    )
    upstream_connect_timeout: float = Field(
        2.0,
        gt=0,
        le=120,
        description="Seconds to open the upstream connection (else 504, or the next upstream); "
        "below the plugin's 2.5 s first_audio_timeout, so a bot hears the gateway's answer "
        "rather than its own timeout.",
    )
    upstream_spares: int = Field(
        0,
        ge=0,
        le=16,
        description="Upstream connections to keep open per recently used project, so a "
        "session starts without waiting for the upstream handshake (TCP, TLS and the "
        "upgrade: several round trips to the cloud). Each is replaced before the cloud's "
        "20 s idle rule; 0 turns this off. Whether Huawei counts an idle connection toward "
        "the concurrency quota is not documented.",
    )
    upstream_gap_timeout: float = Field(
        20.0,
        gt=0,
        le=600,
        description="Longest wait for the next upstream message after START (else the "
        "session is closed as a timeout).",
    )
    max_session_seconds: float = Field(
        600.0, gt=0, le=86400, description="Longest a session may last before it is closed."
    )
    max_sessions: int = Field(
        256, ge=1, le=100_000, description="Concurrent sessions; more are refused with 429."
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
    breaker_failures: int = Field(
        5,
        ge=0,
        le=1000,
        description="Consecutive upstream failures (refused, timed out, 5xx, 2xx/3xx instead "
        "of 101, SIS.0312, APIG.0308) that open an upstream's circuit breaker; while open, new "
        "sessions fail over or get 503 at once instead of waiting for "
        "--upstream-connect-timeout. 0 turns the breaker off.",
    )
    breaker_probe_interval: float = Field(
        2.0,
        gt=0,
        le=600,
        description="Seconds from a breaker opening to its first probe (the upstream "
        "handshake alone, no START, nothing billed); each failed probe doubles the wait.",
    )
    breaker_max_probe_interval: float = Field(
        30.0, gt=0, le=3600, description="Longest wait between two probes, in seconds."
    )
    breaker_half_open_sessions: int = Field(
        3,
        ge=1,
        le=1000,
        description="After a successful probe, real sessions let through at a time as "
        "trials; that many successes close the breaker, one failure opens it again.",
    )
    secondary_url: str | None = Field(
        None,
        description="A second upstream (ws:// or wss://host[:port]: another region's "
        "endpoint, or another gateway), used while the first one's breaker is open or its "
        "handshake fails; it has its own breaker and credentials (--secondary-*).",
    )
    secondary_project_id: str | None = Field(
        None,
        description="Project ID to use on the second upstream (another region has another "
        "one); default: the client's.",
    )
    secondary_token: SecretStr | None = Field(
        None, description="IAM token (X-Auth-Token) for the second upstream."
    )
    secondary_access_key: str | None = Field(
        None, description="AK for signing the second upstream's handshakes (with its SK)."
    )
    secondary_secret_key: SecretStr | None = Field(
        None, description="SK for the second upstream (with --secondary-access-key)."
    )
    secondary_gateway_key: SecretStr | None = Field(
        None,
        description="When the second upstream is another rtts-gateway: its --gateway-key, "
        "sent as 'Authorization: Bearer <key>'.",
    )
    fallback: Literal["none", "local"] = Field(
        "none",
        description="Last resort when every upstream's breaker is open or its handshake "
        "failed: 'none' answers 503 with Retry-After; 'local' serves the session from the "
        "embedded espeak-ng engine (a different voice, but the caller hears speech). Only "
        "before a session's first audio byte: a session never changes upstream once begun.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Logging threshold."
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="Event loop: 'auto' uses uvloop when it is installed (a dependency on "
        "Linux and macOS), else asyncio's own.",
    )

    relay: Literal["auto", "compiled", "python"] = Field(
        "auto",
        description="How sessions are relayed: 'compiled' reads and checks the handshake's "
        "two heads, forwards whole audio frames and reads a TLS upstream's records in C "
        "(gateway/_relay.c and gateway/_heads.c, built by pip install where a C compiler is "
        "present), 'python' on the pure-Python path, 'auto' compiled when it was built. Both "
        "make the same checks and give the same bytes, answers and metrics.",
    )

    @model_validator(mode="after")
    def _check_relay(self) -> Self:
        if self.relay == "compiled" and not fastpath.COMPILED_AVAILABLE:
            raise ValueError(
                f"{_named('relay')} compiled: the compiled fast path was not built for this Python "
                "(it needs a C compiler and the Python headers at install time, on Debian "
                "'apt-get install gcc python3-dev', then reinstall); use 'auto' or 'python'"
            )
        return self

    @property
    def relay_path(self) -> fastpath.RelayPath:
        """The relay path this gateway runs ('auto' resolved)."""
        return fastpath.resolve(self.relay)

    @field_validator("gateway_key", "secondary_gateway_key")
    @classmethod
    def _check_key(cls, key: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """A key as a header carries it: surrounding blanks (a Secret file's newline) dropped."""
        if key is None:
            return None
        name = _named(str(info.field_name))
        value = key.get_secret_value().strip()
        if not value:
            raise ValueError(
                f"{name} is empty: set a key, or leave it unset to admit callers without one"
            )
        bad = next((i for i, ch in enumerate(value, 1) if not "!" <= ch <= "~"), None)
        if bad is not None:  # the key itself is never quoted
            raise ValueError(
                f"{name} must be printable ASCII without blanks (it travels as "
                f"'Authorization: Bearer <key>'); its character {bad} of {len(value)} is not"
            )
        return SecretStr(value)

    @model_validator(mode="after")
    def _check_backend(self) -> Self:
        if self.upstream_url is not None:
            _check_upstream_url("upstream_url", self.upstream_url)
        if self.resolved_backend == "huawei" and self.upstream_url is None:
            if self.region is None:
                raise ValueError(
                    f"the huawei backend needs {_named('region')} "
                    f"(or {_named('upstream_url')} for another gateway)"
                )
            if not self.has_credentials:
                raise ValueError(
                    "the huawei backend needs credentials: --token, an IAM user (--iam-username, "
                    "--iam-password, --iam-domain) or --access-key + --secret-key, as flags or "
                    f"as {ENV_PREFIX}* variables"
                )
        self._check_failover()
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"{_named('ca_file')}: {str(self.ca_file)!r} is not a readable file")
        if self.allowed_project_ids is not None and not self.project_allow_list:
            raise ValueError(
                f"{_named('allowed_project_ids')} lists no project id, so no caller could be "
                "served: list them separated by commas, or leave it unset to serve any"
            )
        for project in self.project_allow_list or ():
            if not PROJECT_ID.fullmatch(project):
                raise ValueError(
                    f"{_named('allowed_project_ids')} has a bad project id {project!r}: "
                    "1 to 128 ASCII letters, digits, - or _ (as in /v1/{project_id}/rtts)"
                )
        return self

    def _check_failover(self) -> None:
        if self.breaker_max_probe_interval < self.breaker_probe_interval:
            raise ValueError(
                f"--breaker-max-probe-interval ({self.breaker_max_probe_interval:g}) must not "
                f"be below --breaker-probe-interval ({self.breaker_probe_interval:g})"
            )
        local = self.resolved_backend == "local"
        if local and self.fallback == "local":
            raise ValueError(
                "--fallback local backs up the huawei backend; this gateway's backend is "
                "already the local engine (set --backend huawei with credentials or "
                "--upstream-url, or drop --fallback)"
            )
        secondary = {
            "secondary_project_id": self.secondary_project_id,
            "secondary_token": self.secondary_token,
            "secondary_access_key": self.secondary_access_key,
            "secondary_secret_key": self.secondary_secret_key,
            "secondary_gateway_key": self.secondary_gateway_key,
        }
        if self.secondary_url is None:
            given = [name for name, value in secondary.items() if value is not None]
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise ValueError(
                    f"{flag} ({ENV_PREFIX}{given[0].upper()}) is set but --secondary-url "
                    f"({ENV_PREFIX}SECONDARY_URL) is not"
                )
            return
        _check_upstream_url("secondary_url", self.secondary_url)
        if local:
            raise ValueError(
                "--secondary-url backs up the huawei backend's upstream; this gateway's "
                "backend is the local engine (set --backend huawei, or use --fallback local "
                "on a huawei gateway)"
            )
        project = self.secondary_project_id
        if project is not None and not PROJECT_ID.fullmatch(project):
            raise ValueError(
                f"--secondary-project-id must be 1 to 128 letters, digits, - or _, got {project!r}"
            )
        schemes = [
            name
            for name, present in (
                ("--secondary-token", self.secondary_token is not None),
                (
                    "--secondary-access-key/--secondary-secret-key",
                    self.secondary_access_key is not None or self.secondary_secret_key is not None,
                ),
                ("--secondary-gateway-key", self.secondary_gateway_key is not None),
            )
            if present
        ]
        if len(schemes) > 1:
            raise ValueError(
                f"the second upstream takes one way to authenticate, not {' and '.join(schemes)}"
            )
        if (self.secondary_access_key is None) != (self.secondary_secret_key is None):
            raise ValueError(
                "AK/SK signing of the second upstream needs both --secondary-access-key and "
                "--secondary-secret-key"
            )

    def secondary_auth(self) -> tuple[HandshakeAuth, dict[str, str]]:
        """The second upstream's authenticator and extra handshake headers."""
        if self.secondary_token is not None:
            return StaticTokenAuth(self.secondary_token.get_secret_value()), {}
        if self.secondary_access_key is not None and self.secondary_secret_key is not None:
            return AkSkAuth(
                self.secondary_access_key, self.secondary_secret_key.get_secret_value()
            ), {}
        if self.secondary_gateway_key is not None:
            key = self.secondary_gateway_key.get_secret_value()
            return NoAuth(), {"Authorization": f"Bearer {key}"}
        return NoAuth(), {}

    @property
    def resolved_backend(self) -> Literal["local", "huawei"]:
        """The backend in use: 'auto' resolved by whether an upstream is configured."""
        if self.backend != "auto":
            return self.backend
        return "huawei" if self.has_credentials or self.upstream_url else "local"

    @property
    def project_allow_list(self) -> frozenset[str] | None:
        """Project IDs clients may use, or ``None`` for any."""
        if self.allowed_project_ids:
            return frozenset(p.strip() for p in self.allowed_project_ids.split(",") if p.strip())
        return frozenset({self.project_id}) if self.project_id else None

    @property
    def upstream_base(self) -> str:
        """Scheme and host of the upstream; ``/v1/{project_id}/rtts`` is appended per client."""
        if self.upstream_url is not None:
            return self.upstream_url.rstrip("/")
        return f"wss://sis-ext.{self.region}.myhuaweicloud.com"
