"""The README tells the truth about the voice catalogue and the gateway's settings."""

from __future__ import annotations

from pathlib import Path

from gateway.engine.voices import ESPEAK_VOICES
from gateway.settings import ENV_PREFIX, GatewaySettings
from rtts_plugin.config import HuaweiRTTSConnection
from rtts_plugin.protocol import VOICES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_voice_table_matches_the_catalogue() -> None:
    for voice in VOICES.values():
        row = (
            f"| `{voice.name}` | {voice.language} | {voice.tier} | {voice.text_limit} | "
            f"{', '.join(voice.formats)} | {', '.join(voice.sample_rates)} | "
            f"{'yes' if voice.subtitles else 'no'} | `{ESPEAK_VOICES[voice.name]}` |"
        )
        assert row in README, f"README row for {voice.name} is missing or stale"


def test_settings_table_lists_every_setting_with_its_default() -> None:
    for name, field in GatewaySettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        row = f"| `{flag}` | `{ENV_PREFIX}{name.upper()}` | `{field.default}` |"
        assert row in README, f"README row for {flag} is missing or stale"


def test_plugin_settings_table_lists_every_connection_field() -> None:
    for name, field in HuaweiRTTSConnection.model_fields.items():
        default = "—" if field.default is None else f"`{field.default}`"
        row = f"| `{name}` | `HUAWEI_RTTS_{name.upper()}` | {default} | {field.description} |"
        assert row in README, f"README row for {name} is missing or stale"


def test_quick_start_has_the_two_commands() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = [
        line.split("#")[0].strip() for line in quick_start.splitlines() if line.startswith("bash ")
    ]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def test_error_code_table_covers_every_documented_code() -> None:
    from rtts_plugin.protocol.codes import DESCRIPTIONS

    table = README.split("## Huawei error codes", 1)[1].split("\n## ", 1)[0]
    for code in DESCRIPTIONS:
        assert f"| `{code}` |" in table, f"{code} is missing from the README's error table"
    for code in ("APIG.0101", "APIG.0301", "APIG.0308", "APIG.0610"):
        assert f"`{code}`" in table
