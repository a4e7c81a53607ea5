"""Authentication of the rtts WebSocket handshake: static token, IAM password, or AK/SK.

Shared by the plugin (direct to Huawei Cloud) and the gateway (upstream), so there is one
implementation of each scheme. Every class here keeps its secrets out of ``repr()``, logs
and error messages.

- :class:`StaticTokenAuth` sends a ready ``X-Auth-Token``.
- :class:`IamPasswordAuth` exchanges an IAM user's password for a project-scoped token
  (``POST /v3/auth/tokens``; the token comes back in ``X-Subject-Token``), caches it, renews
  it well before its 24 h expiry, and lets only one request be in flight however many
  utterances start at once.
- :class:`AkSkAuth` signs the handshake with SDK-HMAC-SHA256 exactly as Huawei's SDK does.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Final, Protocol
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from websockets.headers import build_host
from websockets.uri import parse_uri

from rtts_plugin.errors import AuthenticationError, HandshakeError

SIGNING_ALGORITHM: Final = "SDK-HMAC-SHA256"
SDK_DATE_FORMAT: Final = "%Y%m%dT%H%M%SZ"
EMPTY_BODY_SHA256: Final = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class HandshakeAuth(Protocol):
    """Produces the headers that authenticate one rtts handshake.

    ``renewable`` says whether :meth:`invalidate` can make the next attempt succeed
    (a fetched token can be fetched again; a static token or a key cannot change).
    """

    renewable: bool

    async def headers(self, url: str) -> dict[str, str]:
        """Headers to send with the upgrade request to ``url``."""
        ...

    def ready_headers(self, url: str) -> dict[str, str] | None:
        """What :meth:`headers` would give now, if that needs no wait (else ``None``)."""
        ...

    def invalidate(self) -> None:
        """Forget cached credentials after the server rejected them (HTTP 401)."""
        ...


class NoAuth:
    """No credentials: for a gateway on loopback, which holds them itself."""

    renewable = False

    async def headers(self, url: str) -> dict[str, str]:
        """No headers."""
        return {}

    def ready_headers(self, url: str) -> dict[str, str]:
        """No headers."""
        return {}

    def invalidate(self) -> None:
        """Nothing to forget."""

    def __repr__(self) -> str:
        return "NoAuth()"


class StaticTokenAuth:
    """A ready IAM token sent as ``X-Auth-Token`` (it expires after at most 24 h)."""

    renewable = False

    def __init__(self, token: str) -> None:
        if not token.strip():
            raise ValueError("the X-Auth-Token is empty; pass the IAM token (X-Subject-Token)")
        self._token = token.strip()

    async def headers(self, url: str) -> dict[str, str]:
        """``X-Auth-Token``."""
        return {"X-Auth-Token": self._token}

    def ready_headers(self, url: str) -> dict[str, str]:
        """``X-Auth-Token``."""
        return {"X-Auth-Token": self._token}

    def invalidate(self) -> None:
        """A static token cannot be renewed; the next attempt fails the same way."""

    def __repr__(self) -> str:
        return "StaticTokenAuth(token=***)"


class IamPasswordAuth:
    """An IAM user's password exchanged for a project-scoped token, cached and renewed.

    The token is renewed once half its lifetime has passed (12 h of 24 h), well before it
    expires; a 401 from the service also drops it, since a changed password or permission
    revokes tokens early. Concurrent callers share one request.
    """

    renewable = True

    def __init__(
        self,
        *,
        username: str,
        password: str,
        domain: str,
        region: str,
        project_id: str | None = None,
        iam_endpoint: str | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in (
            ("username", username),
            ("password", password),
            ("domain", domain),
            ("region", region),
        ):
            if not value.strip():
                raise ValueError(
                    f"IAM {name} is empty; IAM password auth needs user, password, domain "
                    "and region"
                )
        self._username = username
        self._password = password
        self._domain = domain
        self._region = region
        self._project_id = project_id
        self.endpoint = (iam_endpoint or f"https://iam.{region}.myhuaweicloud.com").rstrip("/")
        self._timeout = timeout
        self._clock = clock
        self._token: str | None = None
        self._renew_at = 0.0
        self._fetching: asyncio.Task[str] | None = None

    def __repr__(self) -> str:
        return (
            f"IamPasswordAuth(username={self._username!r}, domain={self._domain!r}, "
            f"region={self._region!r}, password=***)"
        )

    def _body(self) -> dict[str, object]:
        project: dict[str, str] = (
            {"id": self._project_id} if self._project_id else {"name": self._region}
        )
        return {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": self._username,
                            "password": self._password,
                            "domain": {"name": self._domain},
                        }
                    },
                },
                "scope": {"project": project},
            }
        }

    async def headers(self, url: str) -> dict[str, str]:
        """``X-Auth-Token`` with a valid cached token, fetching one if needed."""
        return {"X-Auth-Token": await self.token()}

    def ready_headers(self, url: str) -> dict[str, str] | None:
        """``X-Auth-Token`` with the cached token, if it needs no renewal yet."""
        token = self._fresh_token()
        return None if token is None else {"X-Auth-Token": token}

    def _fresh_token(self) -> str | None:
        """The cached token while it has at least half its lifetime left."""
        if self._token is not None and self._clock() < self._renew_at:
            return self._token
        return None

    async def token(self) -> str:
        """A token with at least half its lifetime left; one request at a time.

        A caller that stops waiting (its utterance's time budget ran out) does not cancel
        the request: the token it fetches is there for the next caller.
        """
        token = self._fresh_token()
        if token is not None:
            return token
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.get_running_loop().create_task(self._renew())
            self._fetching.add_done_callback(_retrieve)
        return await asyncio.shield(self._fetching)

    async def _renew(self) -> str:
        self._token, self._renew_at = await self._fetch()
        return self._token

    def invalidate(self) -> None:
        """Drop the cached token so the next handshake fetches a new one."""
        self._token = None

    async def _fetch(self) -> tuple[str, float]:
        url = f"{self.endpoint}/v3/auth/tokens"
        issued = self._clock()
        try:
            async with (
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self._timeout)
                ) as session,
                session.post(
                    url,
                    data=json.dumps(self._body()),
                    headers={"Content-Type": "application/json;charset=utf8"},
                    # The body holds the password: never re-post it where a 3xx points.
                    allow_redirects=False,
                ) as response,
            ):
                body = await response.text()
                if 300 <= response.status < 400:
                    raise AuthenticationError(
                        f"IAM at {self.endpoint} answered HTTP {response.status} (a redirect); "
                        "it is not followed, so the password goes nowhere else: set the IAM "
                        "endpoint to the host that issues tokens"
                    )
                if response.status == 429 or response.status >= 500:
                    # IAM busy or down: transient, as a cloud's 429 or 5xx is.
                    raise HandshakeError(
                        response.status,
                        "",
                        f"IAM at {self.endpoint} could not issue a token now "
                        f"(HTTP {response.status}{_iam_error(body)})",
                    )
                if response.status not in {201, 200}:
                    raise AuthenticationError(
                        f"IAM at {self.endpoint} refused the token request for user "
                        f"{self._username!r} (HTTP {response.status}{_iam_error(body)}); check "
                        "the user name, password, account (domain) name and region"
                    )
                token = response.headers.get("X-Subject-Token", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The network's fault, not the credentials': transient, as a refused connection is.
            raise HandshakeError(
                0, "", f"cannot reach IAM at {self.endpoint}: {exc.__class__.__name__}"
            ) from None
        if not token:
            raise AuthenticationError(
                f"IAM at {self.endpoint} answered without an X-Subject-Token header"
            )
        return token, issued + _lifetime(body, issued) / 2


def _retrieve(task: asyncio.Task[str]) -> None:
    """Mark a fetch's failure as seen: every waiter may have given up (it is raised to them)."""
    if not task.cancelled():
        task.exception()


def _iam_error(body: str) -> str:
    """IAM's own error code and message, which never contain the password."""
    try:
        error = json.loads(body).get("error", {})
        return f", {error.get('code', '')}: {error.get('message', '')}"[:200] if error else ""
    except (ValueError, AttributeError):
        return ""


def _lifetime(body: str, issued: float) -> float:
    """Seconds the token lives, from ``token.expires_at``; 24 h if IAM did not say."""
    try:
        expires_at = json.loads(body)["token"]["expires_at"]
        expiry = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
        return max(expiry - issued, 60.0)
    except (ValueError, KeyError, TypeError, AttributeError):
        return 24 * 3600.0


class AkSkAuth:
    """AK/SK signing of the handshake (SDK-HMAC-SHA256), as Huawei's Python SDK does it.

    The URL is signed as ``https``/``http`` with method ``GET``, an empty body and the
    headers ``host`` and ``x-sdk-date``; the canonical URI always ends in ``/``. Only
    ``X-Sdk-Date`` and ``Authorization`` are sent: the WebSocket library sends the one
    ``Host`` header itself, with the same value that was signed.
    """

    renewable = False

    def __init__(
        self, access_key: str, secret_key: str, *, clock: Callable[[], datetime] | None = None
    ) -> None:
        if not access_key.strip() or not secret_key.strip():
            raise ValueError("AK/SK auth needs both the access key (AK) and the secret key (SK)")
        self.access_key = access_key.strip()
        self._secret_key = secret_key.strip()
        self._clock = clock or (lambda: datetime.now(UTC))

    def __repr__(self) -> str:
        return f"AkSkAuth(access_key={self.access_key!r}, secret_key=***)"

    async def headers(self, url: str) -> dict[str, str]:
        """``X-Sdk-Date`` and ``Authorization`` for a GET of ``url``."""
        return self.sign(url)

    def ready_headers(self, url: str) -> dict[str, str]:
        """``X-Sdk-Date`` and ``Authorization`` for a GET of ``url`` (signed now)."""
        return self.sign(url)

    def invalidate(self) -> None:
        """A signature is made fresh for every handshake; nothing is cached."""

    def sign(self, url: str, sdk_date: str | None = None) -> dict[str, str]:
        """The signed headers for a GET upgrade request to ``url``."""
        date = sdk_date or self._clock().strftime(SDK_DATE_FORMAT)
        headers = {"host": host_header(url), "x-sdk-date": date}
        canonical = canonical_request("GET", url, headers)
        string_to_sign = (
            f"{SIGNING_ALGORITHM}\n{date}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        signature = hmac.new(
            self._secret_key.encode(), string_to_sign.encode(), hashlib.sha256
        ).hexdigest()
        signed = ";".join(sorted(headers))
        return {
            "X-Sdk-Date": date,
            "Authorization": (
                f"{SIGNING_ALGORITHM} Access={self.access_key}, SignedHeaders={signed}, "
                f"Signature={signature}"
            ),
        }


def host_header(url: str) -> str:
    """The ``Host`` header websockets sends for ``url`` (the port only when not the default).

    Built by websockets' own function, so the signed value is the one on the wire.
    """
    uri = parse_uri(url)
    return build_host(uri.host, uri.port, uri.secure)


def canonical_request(method: str, url: str, headers: Mapping[str, str]) -> str:
    """The SDK-HMAC-SHA256 canonical request for a body-less request."""
    parts = urlsplit(url)
    segments = [quote(segment, safe="~") for segment in unquote(parts.path or "/").split("/")]
    canonical_uri = "/".join(segments)
    if not canonical_uri.endswith("/"):
        canonical_uri += "/"
    query = sorted(
        (quote(unquote(key), safe="~"), quote(unquote(value), safe="~"))
        for key, _, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    canonical_query = "&".join(f"{key}={value}" for key, value in query)
    lowered = {name.lower(): value.strip() for name, value in headers.items()}
    canonical_headers = "".join(f"{name}:{lowered[name]}\n" for name in sorted(lowered))
    signed_headers = ";".join(sorted(lowered))
    return "\n".join(
        [
            method.upper(),
            canonical_uri,
            canonical_query,
            canonical_headers,
            signed_headers,
            EMPTY_BODY_SHA256,
        ]
    )
