"""Text splitting (property-based) and the voice catalogue."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine.voices import ESPEAK_VOICES, espeak_pitch, espeak_volume, rate_wpm
from rtts_plugin.protocol import VOICES, get_voice
from rtts_plugin.protocol.text import split_text
from rtts_plugin.protocol.voices import suggest_voices

_ALPHABET = st.sampled_from([*"abc xyz.,!?;:，。！？你好世界\n\t ", "é", "😀"])


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=_ALPHABET, max_size=400), limit=st.integers(1, 60))
def test_split_keeps_every_character_in_order_within_the_limit(text: str, limit: int) -> None:
    pieces = split_text(text, limit)
    assert all(0 < len(piece) <= limit for piece in pieces)
    assert all(piece == piece.strip() for piece in pieces)
    assert _squeeze("".join(pieces)) == _squeeze(text)
    position = 0
    for piece in pieces:  # each piece is the next stretch of the original text
        position = text.index(piece, position) + len(piece)


@settings(max_examples=200, deadline=None)
@given(
    words=st.lists(st.text(alphabet="abcdefghij", min_size=1, max_size=8), min_size=1, max_size=60)
)
def test_split_never_cuts_inside_a_word_when_a_space_fits(words: list[str]) -> None:
    pieces = split_text(" ".join(words), 10)
    assert [w for piece in pieces for w in piece.split(" ")] == words


def test_split_prefers_sentence_then_clause_then_space() -> None:
    text = "First one is here. Second, with a clause and more words"
    assert split_text(text, 30) == ["First one is here.", "Second,", "with a clause and more words"]
    assert split_text("aaa, bbb ccc", 9) == ["aaa,", "bbb ccc"]
    assert split_text("你好，世界。很高兴见到你。", 8) == ["你好，世界。", "很高兴见到你。"]
    assert split_text("", 5) == [] and split_text("   ", 5) == []
    with pytest.raises(ValueError, match="at least 1"):
        split_text("x", 0)


def test_catalogue_matches_the_protocol_doc() -> None:
    assert len(VOICES) == 25
    standard = [v for v in VOICES.values() if v.tier == "standard"]
    assert {v.name for v in standard} == {
        f"chinese_{n}_common" for n in ("xiaoqi", "xiaoyu", "xiaoyan", "xiaowang")
    }
    assert all(v.text_limit == 500 and v.billing_unit_chars == 100 for v in standard)
    subtitled = {v.name for v in VOICES.values() if v.subtitles and v.tier == "premium"}
    assert subtitled == {
        f"chinese_huaxiao{n}_common"
        for n in ("mei", "fei", "he", "ye", "xue", "jiao", "hui", "kang", "kun", "quan")
    }
    for name in ("chinese_huaxiaomei_common", "chinese_huaxiaofei_common"):
        voice = get_voice(name)
        assert voice is not None and voice.formats == ("pcm",)
    for name in ("chinese_huaxiaolong_common", "chinese_huaxiaorui_common"):
        voice = get_voice(name)
        assert voice is not None and voice.sample_rates == ("16000",)
    for name in (
        "chinese_huaxiaoru_common",
        "chinese_huaxiaohan_common",
        "chinese_huaxiaozhen_common",
    ):
        voice = get_voice(name)
        assert voice is not None and voice.text_limit == 500
    assert (
        get_voice("english_amy_common") is not None
        and get_voice("english_amy_common").text_limit == 10_000
    )  # type: ignore[union-attr]
    assert {v.language for v in VOICES.values()} == {"zh-CN", "en-US", "ar"}
    assert get_voice("nobody") is None
    assert suggest_voices("english_amy")[0] == "english_amy_common"


def test_every_voice_maps_to_an_espeak_voice_and_ranges_map_monotonically() -> None:
    assert set(ESPEAK_VOICES) == set(VOICES)
    assert len(set(ESPEAK_VOICES.values())) > 10  # voices sound distinct
    assert (rate_wpm(-500), rate_wpm(0), rate_wpm(500)) == (88, 175, 350)
    assert (espeak_pitch(-500), espeak_pitch(0), espeak_pitch(500)) == (0, 50, 100)
    assert (espeak_volume(0), espeak_volume(50), espeak_volume(100)) == (0, 100, 200)
