"""Connection settings: constructor arguments, HUAWEI_RTTS_* variables, and clear refusals."""

from __future__ import annotations

import pytest

from rtts_plugin import HuaweiRTTSService
from rtts_plugin.auth import AkSkAuth, IamPasswordAuth, NoAuth, StaticTokenAuth
from rtts_plugin.config import HuaweiRTTSConnection
from rtts_plugin.errors import InvalidSettingsError


def test_region_and_project_resolve_to_the_cloud_endpoint() -> None:
    connection = HuaweiRTTSConnection(region="cn-north-4", project_id="abc123", token="t")
    assert connection.resolved_url == "wss://sis-ext.cn-north-4.myhuaweicloud.com/v1/abc123/rtts"
    assert isinstance(connection.build_auth(), StaticTokenAuth)


def test_url_alone_is_enough_for_a_gateway() -> None:
    connection = HuaweiRTTSConnection(url="ws://127.0.0.1:8765/v1/p/rtts")
    assert connection.resolved_url == "ws://127.0.0.1:8765/v1/p/rtts"
    assert isinstance(connection.build_auth(), NoAuth)


def test_environment_is_read_and_arguments_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUAWEI_RTTS_REGION", "cn-east-3")
    monkeypatch.setenv("HUAWEI_RTTS_PROJECT_ID", "proj")
    monkeypatch.setenv("HUAWEI_RTTS_ACCESS_KEY", "AK1")
    monkeypatch.setenv("HUAWEI_RTTS_SECRET_KEY", "SK1")
    monkeypatch.setenv("HUAWEI_RTTS_MAX_RETRIES", "4")
    tts = HuaweiRTTSService()
    assert tts._url == "wss://sis-ext.cn-east-3.myhuaweicloud.com/v1/proj/rtts"
    assert isinstance(tts._auth, AkSkAuth) and tts._connection.max_retries == 4
    tts = HuaweiRTTSService(project_id="other")
    assert tts._url.endswith("/v1/other/rtts")


def test_iam_settings_build_a_token_fetcher() -> None:
    connection = HuaweiRTTSConnection(
        region="ap-southeast-3",
        project_id="p",
        iam_username="bot",
        iam_password="pw",
        iam_domain="acme",
    )
    auth = connection.build_auth()
    assert (
        isinstance(auth, IamPasswordAuth)
        and auth.endpoint == "https://iam.ap-southeast-3.myhuaweicloud.com"
    )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({}, "say where to connect"),
        ({"region": "cn-north-4"}, "missing: project_id"),
        ({"url": "http://127.0.0.1/v1/p/rtts"}, "url must be ws://"),
        ({"region": "north", "project_id": "p", "token": "t"}, "region must look like cn-north-4"),
        ({"region": "cn-north-4", "project_id": "p/q", "token": "t"}, "project_id must be"),
        ({"region": "cn-north-4", "project_id": "p"}, "needs credentials"),
        (
            {"url": "wss://x/v1/p/rtts", "token": "t", "access_key": "a", "secret_key": "s"},
            "one way to authenticate",
        ),
        ({"url": "wss://x/v1/p/rtts", "access_key": "a"}, "both access_key and secret_key"),
        ({"url": "wss://x/v1/p/rtts", "iam_username": "u", "iam_password": "p"}, "iam_domain"),
        (
            {
                "url": "wss://x/v1/p/rtts",
                "iam_username": "u",
                "iam_password": "p",
                "iam_domain": "d",
            },
            "needs region",
        ),
    ],
)
def test_bad_connection_arguments_are_refused_precisely(
    kwargs: dict[str, str], fragment: str
) -> None:
    with pytest.raises(InvalidSettingsError) as caught:
        HuaweiRTTSService(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(caught.value)
    assert "invalid HuaweiRTTSService connection settings" in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("connect_timeout", 0, "greater than 0"),
        ("prewarm_max_age", 25, "less than 20"),
        ("wire_format", "mp3", "'pcm', 'ulaw' or 'alaw'"),
        ("max_retries", -1, "greater than or equal to 0"),
    ],
)
def test_bad_tuning_values_name_the_field(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        HuaweiRTTSConnection(url="ws://h/v1/p/rtts", **{field: value})  # type: ignore[arg-type]
    assert field in str(caught.value) and fragment in str(caught.value)


def test_secrets_are_hidden_in_validation_errors_and_repr() -> None:
    with pytest.raises(InvalidSettingsError) as caught:
        HuaweiRTTSService(
            url="wss://x/v1/p/rtts", token="tok-SECRET", access_key="ak", secret_key="sk-SECRET"
        )
    assert "SECRET" not in str(caught.value)
    with pytest.raises(ValueError) as raw:
        HuaweiRTTSConnection(url="wss://x/v1/p/rtts", secret_key=12345)  # type: ignore[arg-type]
    assert "12345" not in str(raw.value)
    connection = HuaweiRTTSConnection(
        url="wss://x/v1/p/rtts", access_key="ak", secret_key="sk-SECRET"
    )
    assert "sk-SECRET" not in repr(connection) and "sk-SECRET" not in str(connection)
