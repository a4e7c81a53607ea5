"""START request models and validation: each fault gets the cloud's code and a precise message."""

from __future__ import annotations

import json

import pytest

from rtts_plugin.errors import InvalidRequestError
from rtts_plugin.protocol import (
    StartRequest,
    SynthesisConfig,
    parse_start_request,
    validate_start_request,
)


def payload(text: object = "Hello.", **config: object) -> str:
    return json.dumps({"command": "START", "text": text, "config": config})


def rejected(raw: str) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        parse_start_request(raw)
    return caught.value


def test_defaults_are_the_clouds() -> None:
    request, voice = parse_start_request('{"command": "START", "text": "hi"}')
    config = request.config
    assert (config.audio_format, config.sample_rate, config.voice) == (
        "pcm",
        "8000",
        "chinese_xiaoyan_common",
    )
    assert (config.speed, config.pitch, config.volume, config.subtitle) == (0, 0, 50, None)
    assert voice.name == "chinese_xiaoyan_common"


def test_wire_form_sends_rate_as_string_and_voice_as_property() -> None:
    request = StartRequest(
        command="START",
        text="hi",
        config=SynthesisConfig(voice="english_amy_common", sample_rate="16000"),
    )
    wire = json.loads(request.to_json())
    assert wire == {
        "command": "START",
        "text": "hi",
        "config": {
            "audio_format": "pcm",
            "sample_rate": "16000",
            "property": "english_amy_common",
            "speed": 0,
            "pitch": 0,
            "volume": 50,
        },
    }
    assert "subtitle" not in wire["config"]
    assert parse_start_request(request.to_json())[0] == request


def test_liberal_where_harmless() -> None:
    request, _ = parse_start_request(
        payload(sample_rate=16000, speed=5.0, colour="blue", subtitle="word_level")
    )
    assert request.config.sample_rate == "16000"
    assert request.config.speed == 5
    assert request.config.subtitle == "word_level"


@pytest.mark.parametrize(
    ("raw", "code", "field", "fragments"),
    [
        (
            payload(audio_format="wav"),
            "SIS.0410",
            "audio_format",
            ["'wav'", "pcm, alaw, ulaw, mp3"],
        ),
        (payload(sample_rate="44100"), "SIS.0402", "sample_rate", ["44100", '"8000", "16000"']),
        (payload(sample_rate=True), "SIS.0402", "sample_rate", ["True"]),
        (payload(property="nobody"), "SIS.0411", "property", ["'nobody'", "voice catalogue"]),
        (payload(property=7), "SIS.0411", "property", ["7"]),
        (payload(speed=501), "SIS.0415", "speed", ["501", "-500 to 500"]),
        (payload(speed=-501), "SIS.0415", "speed", ["-501"]),
        (payload(speed="5"), "SIS.0415", "speed", ["'5'"]),
        (payload(speed=True), "SIS.0415", "speed", ["True"]),
        (payload(speed=1.5), "SIS.0415", "speed", ["1.5"]),
        (payload(pitch=600), "SIS.0415", "pitch", ["600", "-500 to 500"]),
        (payload(volume=101), "SIS.0415", "volume", ["101", "0 to 100"]),
        (payload(volume=-1), "SIS.0415", "volume", ["-1"]),
        (
            payload(subtitle="sentence_level"),
            "SIS.0415",
            "subtitle",
            ["sentence_level", "word_level, phoneme_level"],
        ),
        (payload(text=42), "SIS.0415", "text", ["42"]),
        (payload(text=""), "SIS.0415", "text", ["empty"]),
        (payload(text=" \n\t "), "SIS.0415", "text", ["empty"]),
        (
            json.dumps({"command": "STOP", "text": "x"}),
            "SIS.0415",
            "command",
            ["'STOP'", "'START'"],
        ),
        (json.dumps({"command": "START"}), "SIS.0012", "text", ["'text' is required"]),
        (json.dumps({"text": "x"}), "SIS.0012", "command", ["'command' is required"]),
        (
            json.dumps({"command": "START", "text": "x", "config": [1]}),
            "SIS.0032",
            "config",
            ["JSON object"],
        ),
        ("{not json", "SIS.0032", None, ["not valid JSON"]),
        ("[1, 2]", "SIS.0032", None, ["JSON object", "list"]),
        ("", "SIS.0032", None, ["not valid JSON"]),
    ],
)
def test_each_fault_has_the_clouds_code(
    raw: str, code: str, field: str | None, fragments: list[str]
) -> None:
    error = rejected(raw)
    assert error.code == code
    assert error.field == field
    if field:
        assert f"'{field}'" in error.message
    for fragment in fragments:
        assert fragment in error.message


def test_missing_field_is_reported_before_bad_values() -> None:
    assert rejected(json.dumps({"command": "START", "config": {"speed": 9000}})).code == "SIS.0012"


def test_unknown_voice_suggests_the_closest() -> None:
    error = rejected(payload(property="chinese_huaxiaomai_common"))
    assert error.code == "SIS.0411"
    assert "did you mean chinese_huaxiaomei_common" in error.message


def test_rate_the_voice_lacks_gets_the_rate_code() -> None:
    error = rejected(payload(property="chinese_huaxiaolong_common", sample_rate="8000"))
    assert (error.code, error.field) == ("SIS.0402", "sample_rate")
    assert "supports 16000" in error.message
    parse_start_request(payload(property="chinese_huaxiaolong_common", sample_rate="16000"))


@pytest.mark.parametrize(
    "voice", ["chinese_huaxiaomei_common", "chinese_huaxiaofei_common", "arabic_dh_male"]
)
@pytest.mark.parametrize("audio_format", ["alaw", "ulaw", "mp3"])
def test_format_the_voice_lacks_gets_the_format_code(voice: str, audio_format: str) -> None:
    error = rejected(payload(property=voice, audio_format=audio_format))
    assert (error.code, error.field) == ("SIS.0410", "audio_format")
    assert "supports pcm" in error.message


@pytest.mark.parametrize(
    ("voice", "limit"),
    [
        ("chinese_xiaoyan_common", 500),
        ("chinese_huaxiaoru_common", 500),
        ("chinese_huaxiaomei_common", 10_000),
        ("english_amy_common", 10_000),
        ("english_dh_female", 10_000),
    ],
)
def test_text_limit_counts_characters_not_bytes(voice: str, limit: int) -> None:
    at_limit = "语" * limit  # 3 bytes each in UTF-8: only a character count passes
    parse_start_request(payload(text=at_limit, property=voice))
    error = rejected(payload(text=at_limit + "音", property=voice))
    assert (error.code, error.field) == ("SIS.0415", "text")
    assert f"{limit + 1} characters" in error.message and f"{limit}-character" in error.message


def test_long_bad_values_are_cut_in_messages() -> None:
    error = rejected(payload(audio_format="x" * 10_000))
    assert len(error.message) < 300


def test_validate_from_an_object_matches_parsing() -> None:
    request, _ = validate_start_request(
        {"command": "START", "text": "hi", "config": {"property": "english_amy_common"}}
    )
    assert request.config.voice == "english_amy_common"
    with pytest.raises(InvalidRequestError) as caught:
        validate_start_request({"command": "START", "text": "hi", "config": {"volume": 500}})
    assert caught.value.code == "SIS.0415"


def test_deeply_nested_json_is_refused_not_crashing() -> None:
    assert rejected("[" * 100_000 + "]" * 100_000).code == "SIS.0032"
