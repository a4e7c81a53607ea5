"""Handshake authentication: AK/SK against Huawei's own signer, IAM tokens, secrets kept."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from pipecat.utils.errors import ErrorCategory
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request, Response

from rtts_plugin.auth import (
    AkSkAuth,
    IamPasswordAuth,
    StaticTokenAuth,
    canonical_request,
    host_header,
)
from rtts_plugin.errors import AuthenticationError, HandshakeError, RttsError
from rtts_plugin.health import ProbeBackoff, probe_until_answered
from rtts_plugin.transport import is_transient, open_connection, stream_synthesis
from rtts_plugin.tts import error_category
from tests.fakes import FakeCloud, FakeIam, json_response, speak, tone_pcm
from tests.support import exchange, start
from tests.test_gateway import base_of, relay_to
from tests.test_transport import request as start_request

AK, SK = "HPUAEXAMPLEAK0000001", "sk-example-Secret-0123456789abcdefghijkl"


def official_signature(method: str, scheme: str, host: str, path: str, sdk_date: str) -> str:
    """The Authorization header Huawei's SDK signer computes for the same request."""
    request = SdkRequest(
        method=method,
        schema=scheme,
        host=host,
        resource_path=path,
        query_params=[],
        header_params={"X-Sdk-Date": sdk_date},
    )
    Signer(BasicCredentials(AK, SK)).sign(request)
    return str(request.header_params["Authorization"])


@pytest.mark.parametrize(
    "url",
    [
        "wss://sis-ext.cn-north-4.myhuaweicloud.com/v1/0123456789abcdef0123456789abcdef/rtts",
        "ws://127.0.0.1:8765/v1/project-1/rtts",
        "wss://sis-ext.cn-east-3.myhuaweicloud.com:443/v1/p/rtts",
    ],
)
def test_aksk_signature_matches_huaweis_sdk_signer(url: str) -> None:
    auth = AkSkAuth(AK, SK)
    headers = auth.sign(url, sdk_date="20240416T095341Z")
    scheme = "https" if url.startswith("wss") else "http"
    expected = official_signature(
        "GET", scheme, host_header(url), urlsplit(url).path, "20240416T095341Z"
    )
    assert headers == {"X-Sdk-Date": "20240416T095341Z", "Authorization": expected}
    assert "SignedHeaders=host;x-sdk-date" in expected


def test_canonical_request_has_the_trailing_slash_and_empty_body_hash() -> None:
    canonical = canonical_request(
        "get",
        "https://sis-ext.cn-north-4.myhuaweicloud.com/v1/p%7E1/rtts",
        {"Host": "h", "X-Sdk-Date": "d"},
    )
    assert canonical.split("\n") == [
        "GET",
        "/v1/p~1/rtts/",
        "",
        "host:h",
        "x-sdk-date:d",
        "",
        "host;x-sdk-date",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ]
    assert host_header("wss://example.com:443/x") == "example.com"
    assert host_header("ws://example.com:8080/x") == "example.com:8080"


async def test_server_verifies_the_signature_it_received() -> None:
    cloud = FakeCloud()
    verdicts: list[bool] = []

    def verify(request: Request) -> Response | None:
        hosts = request.headers.get_all("Host")
        assert len(hosts) == 1, f"expected one Host header, got {hosts}"
        sdk_date = request.headers["X-Sdk-Date"]
        expected = official_signature("GET", "http", hosts[0], request.path, sdk_date)
        verdicts.append(request.headers["Authorization"] == expected)
        return (
            None if verdicts[-1] else json_response(401, "APIG.0301", "verify aksk signature fail")
        )

    cloud.check_request = verify
    async with cloud.running():
        auth = AkSkAuth(AK, SK)
        events = [
            e
            async for e in stream_synthesis(
                cloud.url, start_request(), headers=await auth.headers(cloud.url)
            )
        ]
        assert events
        forged = AkSkAuth(AK, "wrong-secret")
        with pytest.raises(HandshakeError) as caught:
            async for _ in stream_synthesis(
                cloud.url, start_request(), headers=await forged.headers(cloud.url)
            ):
                pass
    assert verdicts == [True, False]
    assert caught.value.status == 401 and caught.value.error_code == "APIG.0301"


def test_secrets_stay_out_of_repr() -> None:
    texts = [
        repr(AkSkAuth(AK, SK)),
        repr(StaticTokenAuth("MIINRwYJKoZIhvcNAQ-token")),
        repr(
            IamPasswordAuth(
                username="bot", password="hunter2-pw", domain="acme", region="cn-north-4"
            )
        ),
    ]
    for text in texts:
        assert (
            SK not in text and "MIINRwYJKoZIhvcNAQ-token" not in text and "hunter2-pw" not in text
        )
        assert "***" in text


def iam_auth(iam: FakeIam, password: str, **extra: Any) -> IamPasswordAuth:
    """IAM password auth for user "bot" of account "acme" in cn-north-4, against ``iam``."""
    return IamPasswordAuth(
        username="bot",
        password=password,
        domain="acme",
        region="cn-north-4",
        iam_endpoint=iam.endpoint,
        **extra,
    )


async def test_iam_token_is_fetched_once_for_many_concurrent_callers() -> None:
    iam = FakeIam("bot", "hunter2-pw", "acme", delay=0.2)
    async with iam.running():
        auth = iam_auth(iam, "hunter2-pw")
        headers = await asyncio.gather(*(auth.headers("wss://x/v1/p/rtts") for _ in range(20)))
    assert iam.issued == ["token-1"]
    assert all(h == {"X-Auth-Token": "token-1"} for h in headers)
    scope = iam.bodies[0]["auth"]["scope"]  # type: ignore[index]
    assert scope == {"project": {"name": "cn-north-4"}}


async def test_iam_token_is_renewed_at_half_life_and_after_invalidate() -> None:
    now = [datetime.now(UTC).timestamp()]
    iam = FakeIam("bot", "pw", "acme", lifetime_s=24 * 3600)
    async with iam.running():
        auth = iam_auth(iam, "pw", project_id="p1", clock=lambda: now[0])
        assert await auth.token() == "token-1"
        now[0] += 11 * 3600
        assert await auth.token() == "token-1"  # still more than half its life left
        now[0] += 2 * 3600
        assert await auth.token() == "token-2"  # past 12 h of 24: renewed early
        auth.invalidate()
        assert await auth.token() == "token-3"
    assert iam.bodies[0]["auth"]["scope"] == {"project": {"id": "p1"}}  # type: ignore[index]


async def test_iam_rejection_names_the_user_not_the_password() -> None:
    iam = FakeIam("bot", "right-pw", "acme")
    async with iam.running():
        auth = iam_auth(iam, "wrong-pw-123")
        with pytest.raises(AuthenticationError) as caught:
            await auth.token()
    message = str(caught.value)
    assert "HTTP 401" in message and "'bot'" in message and "IAM.0004" in message
    assert "wrong-pw-123" not in message


async def test_unreachable_iam_is_a_clear_error() -> None:
    auth = IamPasswordAuth(
        username="bot",
        password="pw",
        domain="acme",
        region="cn-north-4",
        iam_endpoint="http://127.0.0.1:9",
        timeout=2,
    )
    with pytest.raises(
        HandshakeError, match=r"cannot reach IAM at http://127\.0\.0\.1:9"
    ) as caught:
        await auth.token()
    # The network's fault, not the credentials': retried and counted as transient.
    assert caught.value.status == 0 and is_transient(caught.value)
    assert error_category(caught.value) is ErrorCategory.CONNECTIVITY


async def test_an_iam_that_is_busy_is_transient_and_the_probe_waits_it_out() -> None:
    """IAM answering 503 or 429 cannot issue a token now: transient, as the cloud's own 5xx
    and 429 are, so a recovery probe goes on (only rejected credentials end it)."""
    iam = FakeIam("bot", "pw", "acme")
    iam.unavailable = [503, 429]
    async with iam.running():
        auth = iam_auth(iam, "pw")
        errors: list[RttsError] = []

        async def handshake() -> None:
            try:
                await auth.token()  # what the probe's handshake needs first
            except RttsError as exc:
                errors.append(exc)
                raise

        final = lambda error: error_category(error).is_permanent  # noqa: E731 (as tts._probe)
        probes = await probe_until_answered(handshake, ProbeBackoff(0.01, 0.02), final=final)
    assert probes == 3 and iam.issued == ["token-1"]
    assert [(e.status, error_category(e)) for e in errors] == [  # type: ignore[attr-defined]
        (503, ErrorCategory.SERVER),
        (429, ErrorCategory.RATE_LIMIT),
    ]
    assert all(is_transient(e) and "service busy" in str(e) for e in errors)


@asynccontextmanager
async def silent_iam() -> AsyncIterator[str]:
    """An IAM endpoint that accepts connections and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("fallback", ["none", "local"])
async def test_a_silent_iam_costs_a_gateway_caller_the_connect_budget_not_iams(
    fallback: str,
) -> None:
    """The token a session waits for counts in --upstream-connect-timeout (IAM's own timeout
    is 10 s, past the bot's budget): 504 when it runs out, or the fallback, whose breaker
    hears of it like any upstream that does not answer."""
    async with (
        silent_iam() as iam,
        FakeCloud(default=speak(tone_pcm(0.1, 16000))).running() as cloud,
        relay_to(
            base_of(cloud.url),
            token=None,
            region="cn-north-4",
            iam_username="bot",
            iam_password="pw",
            iam_domain="acme",
            iam_endpoint=iam,
            upstream_connect_timeout=0.5,
            fallback=fallback,
            drain_timeout=1,
        ) as gateway,
    ):
        if fallback == "local":
            seen = await exchange(gateway.url("p"), start("Hello.", property="english_amy_common"))
            assert "AUDIO" in seen.kinds and seen.kinds[-1] == "END"
        else:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(gateway.url("p"), proxy=None, open_timeout=5):
                    pass
            assert refused.value.response.status_code == 504
            assert b"no credentials (IAM token) within 0.5 s" in refused.value.response.body
    assert cloud.requests == []  # no handshake went out without its token


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        (lambda: StaticTokenAuth("  "), "X-Auth-Token is empty"),
        (lambda: AkSkAuth("ak", " "), "both the access key"),
        (
            lambda: IamPasswordAuth(username="u", password="", domain="d", region="r"),
            "IAM password is empty",
        ),
    ],
)
def test_empty_credentials_are_refused(factory: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        factory()  # type: ignore[operator]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_iam_redirect_is_not_followed_so_the_password_stays_home(status: int) -> None:
    iam = FakeIam("bot", "pw-not-for-others", "acme")
    async with iam.running():

        async def redirect(request: web.Request) -> web.Response:
            return web.Response(
                status=status, headers={"Location": f"{iam.endpoint}/v3/auth/tokens"}
            )

        app = web.Application()
        app.router.add_post("/v3/auth/tokens", redirect)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            auth = IamPasswordAuth(
                username="bot",
                password="pw-not-for-others",
                domain="acme",
                region="cn-north-4",
                iam_endpoint=f"http://127.0.0.1:{port}",
            )
            with pytest.raises(AuthenticationError) as caught:
                await auth.token()
        finally:
            await runner.cleanup()
    assert f"HTTP {status} (a redirect)" in str(caught.value)
    assert "pw-not-for-others" not in str(caught.value)
    assert iam.bodies == []  # the password was never posted to the redirect's target


def quoting_refusal(request: Request) -> Response:
    """A server (or a proxy in front of it) that quotes the credentials it refuses."""
    quoted = " ".join(request.headers.get(name, "") for name in ("X-Auth-Token", "Authorization"))
    return json_response(401, "APIG.0301", f"refused credentials: {quoted}")


def secrets_sent(request: Request) -> list[str]:
    """The token, or the AK/SK signature, a handshake carried."""
    signature = re.search(r"Signature=(\w+)", request.headers.get("Authorization", ""))
    return [v for v in (request.headers.get("X-Auth-Token"), signature and signature[1]) if v]


@pytest.mark.parametrize(
    "credentials",
    [
        {"token": "tok-Secret-Quoted-0123456789"},
        {"token": None, "access_key": AK, "secret_key": SK},
    ],
    ids=["token", "ak-sk"],
)
async def test_a_refusal_quoting_the_gateways_credentials_passes_none_of_them_on(
    credentials: dict[str, str | None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cloud = FakeCloud()
    cloud.check_request = quoting_refusal
    async with (
        cloud.running(),
        relay_to(base_of(cloud.url), drain_timeout=1, **credentials) as gateway,
    ):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(gateway.url("p"), proxy=None):
                pass
    answer = bytes(refused.value.response.body).decode()
    assert refused.value.response.status_code == 401
    assert "refused credentials:" in answer and "[redacted]" in answer  # the rest is kept
    (sent,) = cloud.requests
    logged = "\n".join(  # the gateway's log (the fake cloud's own server logs its requests)
        r.getMessage() for r in caplog.records if r.name.startswith(("gateway", "rtts_plugin"))
    )
    assert secrets_sent(sent) and "refused credentials" in logged
    for secret in secrets_sent(sent):
        assert secret not in answer and secret not in logged


async def test_a_refusal_quoting_the_plugins_token_keeps_it_out_of_the_error() -> None:
    cloud = FakeCloud()
    cloud.check_request = quoting_refusal
    async with cloud.running():
        with pytest.raises(HandshakeError) as refused:
            await open_connection(cloud.url, {"X-Auth-Token": "tok-Secret-Plugin-0123456789"})
    assert "tok-Secret-Plugin" not in str(refused.value)
    assert refused.value.error_code == "APIG.0301" and refused.value.status == 401
