"""examples/speak.py end to end, as a user runs it, against the local engine."""

from __future__ import annotations

import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_speak(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "speak.py"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_speak_writes_a_playable_wav_and_prints_timings(tmp_path: Path) -> None:
    out = tmp_path / "hello.wav"
    result = run_speak(
        "Hello there, caller. Your order has shipped.",
        "--out",
        str(out),
        "--voice",
        "chinese_huaxiaomei_common",
        "--subtitle",
        "word_level",
        "--sample-rate",
        "24000",
    )
    assert result.returncode == 0, result.stderr
    assert "local engine listening on ws://127.0.0.1:" in result.stdout
    assert f"wrote {out}" in result.stdout and "TTFB" in result.stdout
    for word in ("Hello", "caller", "shipped"):
        assert f"s  {word}" in result.stdout
    with wave.open(str(out)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert 1.5 < len(samples) / 24000 < 6
    assert np.sqrt(np.mean((samples / 32768.0) ** 2)) > 0.02


def test_speak_reads_stdin(tmp_path: Path) -> None:
    out = tmp_path / "zh.wav"
    result = run_speak(
        "--out",
        str(out),
        "--voice",
        "chinese_xiaoyan_common",
        "--speed",
        "100",
        stdin="你好，世界。",
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000


def test_speak_rejects_bad_settings_clearly(tmp_path: Path) -> None:
    result = run_speak("hi", "--speed", "900", "--out", str(tmp_path / "x.wav"))
    assert result.returncode == 2
    assert "'speed' is invalid: got 900; expected an integer from -500 to 500" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_speak("--out", str(tmp_path / "y.wav"), stdin="  ").returncode == 2
