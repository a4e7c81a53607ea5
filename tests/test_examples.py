"""examples/speak.py end to end, as a user runs it, against the local engine."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
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
    assert "speak.py: --speed: got 900; expected an integer from -500 to 500" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_speak("--out", str(tmp_path / "y.wav"), stdin="  ").returncode == 2
    # The voice is --voice to the user, not the protocol's 'property'.
    voice = run_speak("hi", "--voice", "english_amy", "--out", str(tmp_path / "z.wav"))
    assert voice.returncode == 2
    assert "speak.py: --voice: unknown voice 'english_amy'; did you mean english_amy_common" in (
        voice.stderr
    )


def test_speak_logs_nothing_below_its_log_level(tmp_path: Path) -> None:
    # pipecat logs a banner at INFO on import; the default level is WARNING.
    result = run_speak("Quiet please.", "--out", str(tmp_path / "q.wav"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    loud = run_speak("Loud.", "--out", str(tmp_path / "l.wav"), "--log-level", "DEBUG")
    assert "| DEBUG    | pipecat." in loud.stderr


def test_speak_at_a_terminal_prompts_and_stops_on_the_first_ctrl_c(tmp_path: Path) -> None:
    # As `bash scripts/demo.sh --out x.wav` at a terminal: no text, so it reads the terminal.
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "speak.py"), "--out", str(tmp_path / "x.wav")],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    os.close(terminal)
    try:
        assert process.stderr is not None
        prompt = process.stderr.readline()
        assert "type the text to speak, then Ctrl-D" in prompt
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
        rest = process.stderr.read()
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "speak.py: stopped" in rest and "Traceback" not in rest
    assert not (tmp_path / "x.wav").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _start_stack(*args: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "monitored_stack.py"),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--prometheus-port",
            "0",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    printed: dict[str, str] = {}
    for line in process.stdout:
        key, _, rest = line.partition(" ")
        printed[key] = rest.strip()
        if key == "traffic":
            break
    return process, printed


def _pid(text: str) -> int:
    return int(re.search(r"pid (\d+)", text)[1])  # type: ignore[index]


def test_monitored_stack_serves_traffic_to_a_real_prometheus_and_stops_on_ctrl_c() -> None:
    process, printed = _start_stack("--scrape-interval", "0.5")
    assert (
        "RttsHighErrorRatio" in printed["alerts"] and "fires after 5 minutes" in printed["alerts"]
    )
    prometheus_url = printed["prometheus"].split()[0]
    pids = [_pid(printed["gateway"]), _pid(printed["prometheus"])]
    try:
        sessions = 0.0
        for _ in range(120):
            query = urllib.parse.urlencode({"query": 'sum(rtts_sessions_total{outcome="normal"})'})
            with urllib.request.urlopen(
                f"{prometheus_url}/api/v1/query?{query}", timeout=5
            ) as response:
                result = json.load(response)["data"]["result"]
            sessions = float(result[0]["value"][1]) if result else 0.0
            if sessions > 0:
                break
            time.sleep(0.25)
        assert sessions > 0, "Prometheus never saw a finished session"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    assert "stopped: gateway and prometheus have exited" in (
        process.stdout.read() if process.stdout else ""
    )
    assert not [pid for pid in pids if _alive(pid)]


def test_monitored_stack_stops_by_itself_after_the_duration() -> None:
    process, printed = _start_stack("--duration", "1")
    pids = [_pid(printed["gateway"]), _pid(printed["prometheus"])]
    assert process.wait(timeout=60) == 0
    assert not [pid for pid in pids if _alive(pid)]


def test_monitored_stack_names_its_own_flags_when_a_port_is_taken() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flags, expected in (
            (["--port", port], "choose others with --port and --metrics-port"),
            (["--metrics-port", port], "choose others with --port and --metrics-port"),
            (["--prometheus-port", port], "choose another with --prometheus-port"),
        ):
            defaults = {"--port": "0", "--metrics-port": "0", "--prometheus-port": "0"}
            defaults[flags[0]] = flags[1]
            result = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "examples" / "monitored_stack.py"),
                    *(item for pair in defaults.items() for item in pair),
                    "--duration",
                    "1",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                cwd=ROOT,
            )
            assert result.returncode == 1, result.stderr
            assert expected in result.stderr and "address already in use" in result.stderr
            assert "Traceback" not in result.stderr


def test_drop_in_swap_speaks_the_llm_reply(tmp_path: Path) -> None:
    out = tmp_path / "drop_in.wav"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "drop_in.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "bot said: Your balance is twelve dollars. It is due on Friday." in result.stdout
    with wave.open(str(out)) as wav:
        assert wav.getframerate() == 24000
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert 3 < len(samples) / 24000 < 12 and np.sqrt(np.mean((samples / 32768.0) ** 2)) > 0.02
    source = (ROOT / "examples" / "drop_in.py").read_text()
    assert "#   tts = CartesiaTTSService(" in source and "tts = HuaweiRTTSService(" in source
