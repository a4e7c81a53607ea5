"""Deployment files: the gateway image and the Kubernetes sidecar manifests, checked offline."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import CliApp
from websockets.asyncio.client import connect

from gateway.server import RunningGateway, run_gateway
from gateway.settings import ENV_PREFIX, GatewaySettings
from tests.prometheus import require, running_prometheus
from tests.support import exchange, listening_base, start

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "examples" / "kubernetes"
LEGACY = K8S / "pre-1.29" / "deployment.yaml"  # applied instead of deployment.yaml before 1.29
BIN = Path(sys.executable).parent
# Kinds of operators (Prometheus Operator, KEDA): no schema in kubernetes-validate, checked here.
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule", "ScaledObject"}


def manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            docs[doc["kind"]] = doc
    return docs


def deployments() -> dict[str, dict[str, Any]]:
    """The native-sidecar Deployment and the one for clusters older than 1.29."""
    return {
        "native": manifests()["Deployment"],
        "pre-1.29": yaml.safe_load(LEGACY.read_text(encoding="utf-8")),
    }


def pod_containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def container(name: str) -> dict[str, Any]:
    return pod_containers(manifests()["Deployment"])[name]


def test_dockerfile_passes_hadolint_and_follows_the_rules() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    build, base = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-bookworm", build), f"build image not pinned: {build}"
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), f"base image not pinned: {base}"
    # The same steps CI runs below, on the wheel the build stage compiled.
    assert "RUN sh scripts/install-gateway.sh pip /wheels/*.whl" in dockerfile
    assert 'python -c "import gateway._relay"' in dockerfile
    assert (
        re.search(r"^USER 10001$", dockerfile, re.M)
        and "HEALTHCHECK" in dockerfile
        and "/healthz" in dockerfile
    )


def test_gateway_requirements_match_pyproject_without_pipecat() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [
        ln.strip()
        for ln in (ROOT / "requirements-gateway.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert sorted(lines) == sorted(d for d in project if not d.startswith("pipecat-ai"))


def kubernetes_validate(version: str | None, *files: Path) -> tuple[int, str]:
    result = subprocess.run(
        [
            str(BIN / "kubernetes-validate"),
            "--strict",
            *(["--kubernetes-version", version] if version else []),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("files", "version"),
    [
        ("top", "1.29.0"),  # the first release with native sidecars on by default
        ("top", None),  # the newest kubernetes-validate knows
        ("legacy", "1.25.0"),
        ("legacy", None),
    ],
)
def test_manifests_validate_against_the_kubernetes_schemas(files: str, version: str | None) -> None:
    paths = sorted(K8S.glob("*.yaml")) if files == "top" else [LEGACY]
    code, output = kubernetes_validate(version, *paths)
    assert code == 0, output
    assert "ERROR" not in output and "invalid" not in output.lower()
    assert "deployment/voice-bot against version" in output
    if files == "top":
        assert "secret/huawei-rtts against version" in output
        assert "poddisruptionbudget/voice-bot against version" in output
    # Operator resources have no schema in kubernetes-validate: checked by the tests below.
    unchecked = set(re.findall(r"Couldn't find schema for kind (\w+)", output))
    assert unchecked <= OPERATOR_KINDS


def test_the_schema_check_knows_native_sidecars() -> None:
    # Before 1.28 a container had no restartPolicy: strict validation must say so, which shows
    # the field is checked, and why clusters older than 1.29 need the pre-1.29 manifest.
    code, output = kubernetes_validate("1.27.0", K8S / "deployment.yaml")
    assert code != 0 and "'restartPolicy' was unexpected" in output


def test_prometheusrule_is_generated_from_the_alert_rules_and_valid(tmp_path: Path) -> None:
    check = subprocess.run(
        [sys.executable, str(K8S / "generate_prometheusrule.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    rule = manifests()["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    source = yaml.safe_load((ROOT / "grafana" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(
        [require("promtool"), "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def gateway_settings(gateway: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> GatewaySettings:
    """The settings the gateway container would run with: its args, its env (the example
    Secret's values for the references), defaults for the rest."""
    secret = manifests()["Secret"]["stringData"]
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for item in gateway["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
        else:
            monkeypatch.setenv(item["name"], secret[item["valueFrom"]["secretKeyRef"]["key"]])
    return CliApp.run(GatewaySettings, cli_args=gateway["args"])


def seconds(command: list[str]) -> float:
    assert command[0] == "sleep", command
    return float(command[1])


@pytest.mark.parametrize("layout", ["native", "pre-1.29"])
def test_sidecar_manifest_is_consistent(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = manifests()
    deployment = deployments()[layout]
    pod = deployment["spec"]["template"]
    containers = pod_containers(deployment)
    gateway, bot = containers["rtts-gateway"], containers["bot"]
    settings = gateway_settings(gateway, monkeypatch)
    assert all(
        e["name"].startswith(ENV_PREFIX)
        and e["name"].removeprefix(ENV_PREFIX).lower() in GatewaySettings.model_fields
        for e in gateway["env"]
    )
    # Ports: the probes and the scrape reach the metrics port the gateway listens on, from the
    # pod's IP (kubelet and Prometheus do not come from 127.0.0.1); the bot uses the rtts port.
    assert settings.metrics_host == "0.0.0.0" and settings.resolved_backend == "huawei"
    assert gateway["ports"] == [{"name": "metrics", "containerPort": settings.metrics_port}]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(settings.metrics_port)
    bot_env = {e["name"]: e.get("value") for e in bot["env"]}
    assert bot_env["HUAWEI_RTTS_URL"].startswith(f"ws://{settings.host}:{settings.port}/v1/")
    assert settings.host == "127.0.0.1"  # the rtts port stays inside the pod
    # Probes: readiness (and start-up) is /readyz, the gateway's own state; liveness /healthz.
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    spec = pod["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    bot_stop = seconds(bot["lifecycle"]["preStop"]["exec"]["command"]) + float(
        bot_env["BOT_DRAIN_SECONDS"]
    )
    if layout == "native":
        # The gateway starts before the bot and stops after it: Kubernetes orders it.
        assert [c["name"] for c in spec["initContainers"]] == ["rtts-gateway"]
        assert gateway["restartPolicy"] == "Always" and "lifecycle" not in gateway
        assert [c["name"] for c in spec["containers"]] == ["bot"]
        startup = gateway["startupProbe"]
        assert startup["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 30
        # The bot's stop, then the gateway's drain, one after the other, within the grace.
        assert grace >= bot_stop + settings.drain_timeout + 5
    else:
        # The gateway is listed first and its postStart hook waits for /readyz; its preStop
        # outlasts the bot's whole stop, so it relays until the bot is done, then drains.
        assert [c["name"] for c in spec["containers"]] == ["rtts-gateway", "bot"]
        assert "initContainers" not in spec
        hook = gateway["lifecycle"]["postStart"]["exec"]["command"]
        assert hook[:2] == ["python", "-c"] and "/readyz" in hook[2]
        gateway_wait = seconds(gateway["lifecycle"]["preStop"]["exec"]["command"])
        assert gateway_wait >= bot_stop
        assert grace >= gateway_wait + settings.drain_timeout + 5
    assert gateway["resources"]["requests"] and gateway["resources"]["limits"]
    secret_keys = set(docs["Secret"]["stringData"])
    for item in [*gateway["env"], *bot["env"]]:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == docs["Secret"]["metadata"]["name"] and ref["key"] in secret_keys
    monitor = docs["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"] == pod["metadata"]["labels"]
    assert monitor["podMetricsEndpoints"][0]["port"] == "metrics"
    assert {"targetLabel": "job", "replacement": "rtts-gateway"} in monitor["podMetricsEndpoints"][
        0
    ]["relabelings"]


def test_the_two_layouts_differ_only_in_ordering() -> None:
    native, legacy = deployments().values()
    for deployment in (native, legacy):
        spec = deployment["spec"]["template"]["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            c.pop("lifecycle", None)
            c.pop("restartPolicy", None)
            c.pop("startupProbe", None)
            c["env"] = [e for e in c["env"] if e["name"] != "RTTS_GATEWAY_METRICS_PORT"]
        spec["containers"] = [*spec.pop("initContainers", []), *spec["containers"]]
    assert native == legacy


async def test_the_pre_129_start_hook_waits_for_a_ready_gateway(gateway: RunningGateway) -> None:
    hook = pod_containers(yaml.safe_load(LEGACY.read_text()))["rtts-gateway"]["lifecycle"]
    command = hook["postStart"]["exec"]["command"]
    python = [sys.executable, *command[1:]]
    with socket.socket() as closed:  # a port nobody listens on: the hook keeps waiting
        closed.bind(("127.0.0.1", 0))
        waiting = await asyncio.create_subprocess_exec(
            *python, env={**os.environ, "RTTS_GATEWAY_METRICS_PORT": str(closed.getsockname()[1])}
        )
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiting.wait()), 1.5)
        waiting.kill()
        await waiting.wait()
    port = str(gateway.metrics_port)
    ready = await asyncio.create_subprocess_exec(
        *python, env={**os.environ, "RTTS_GATEWAY_METRICS_PORT": port}
    )
    assert await asyncio.wait_for(ready.wait(), 20) == 0


@pytest.mark.timeout(600)
async def test_image_install_steps_give_a_working_gateway_without_pipecat(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    await _run(sys.executable, "-m", "venv", str(venv))
    await _run("sh", str(ROOT / "scripts" / "install-gateway.sh"), f"{venv}/bin/python -m pip")
    lean = await asyncio.create_subprocess_exec(
        str(venv / "bin" / "python"), "-c", "import pipecat", stderr=subprocess.DEVNULL
    )
    assert await lean.wait() != 0, "the gateway install must not pull in pipecat"
    # pip compiled the relay's fast path (this machine, like the image's build stage, has gcc).
    await _run(str(venv / "bin" / "python"), "-c", "import gateway._relay")
    process = await asyncio.create_subprocess_exec(
        str(venv / "bin" / "rtts-gateway"),
        "--port",
        "0",
        "--metrics-port",
        "0",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        base = await listening_base(process)
        seen = await exchange(
            f"{base}/v1/image/rtts", start("The image works.", property="english_amy_common")
        )
        assert seen.kinds == ["START", "AUDIO", "END"] and len(seen.audio) > 8000
        # The process the manifests size "about 70 MiB" (with the local engine loaded).
        rss = rss_mib(process.pid)
        assert 20 < rss < 1.5 * 70, f"gateway RSS {rss:.1f} MiB"
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]


async def _run(*command: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()[-3000:]


def test_each_manifest_is_one_labelled_resource() -> None:
    # Each file is one resource with the app label, so `kubectl apply -f examples/kubernetes/` is tidy.
    for path in [*K8S.glob("*.yaml"), LEGACY]:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert len(docs) == 1
        assert docs[0]["metadata"]["labels"]["app.kubernetes.io/name"] == "voice-bot", path
    json.dumps(manifests())  # serializable as the API server would take it


# -- scaling ---------------------------------------------------------------------------------


def test_scaledobject_scales_the_deployment_on_sessions_relative_to_the_limit() -> None:
    docs = manifests()
    scaled = docs["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"name": docs["Deployment"]["metadata"]["name"]}
    assert "replicas" not in docs["Deployment"]["spec"]  # the autoscaler owns the count
    (trigger,) = spec["triggers"]
    # KEDA's fallback works only with AverageValue triggers (its admission check says so).
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert spec["fallback"]["failureThreshold"] >= 1
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    meta = trigger["metadata"]
    assert 0 < float(meta["threshold"]) < 0.8  # below RttsSessionsNearLimit's 80%
    assert meta["ignoreNullValues"] == "false"  # no data is an error (fallback), not zero
    assert meta["serverAddress"].startswith("http")
    # The job label is the one the PodMonitor sets, on both metrics of the query.
    assert meta["query"].count('job="rtts-gateway"') == 2
    # A drain must leave a pod serving: more pods at the minimum than the budget may take.
    budget = docs["PodDisruptionBudget"]["spec"]
    assert spec["minReplicaCount"] > budget["maxUnavailable"]
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"] == pod_labels
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


async def test_scaledobject_query_measures_sessions_in_full_gateways(tmp_path: Path) -> None:
    # The query, run by a real Prometheus scraping a real gateway: N sessions held open on a
    # gateway with --max-sessions M read N / M, so KEDA's pods = ceil(N / M / threshold).
    trigger = manifests()["ScaledObject"]["spec"]["triggers"][0]["metadata"]
    query = re.sub(r',\s*namespace="[^"]*"', "", trigger["query"])  # one namespace here
    held = []
    async with run_gateway(GatewaySettings(port=0, metrics_port=0, max_sessions=8)) as gateway:
        async with running_prometheus(
            tmp_path, [gateway.metrics_url.removeprefix("http://")]
        ) as prometheus:
            try:
                for _ in range(6):  # admitted sessions waiting for START count as active
                    held.append(await connect(gateway.url(), proxy=None, compression=None))
                assert await prometheus.wait_for(query, 6 / 8) == 6 / 8
            finally:
                for ws in held:
                    await ws.close()
    threshold = float(trigger["threshold"])
    assert math.ceil(6 / 8 / threshold) == 2  # 6 sessions at M=8 and 0.6: two pods


# -- sizing ----------------------------------------------------------------------------------


def benchmark_figures() -> tuple[float, float]:
    """The gateway's worst CPU ms and KiB per session in BENCHMARKS.md's capacity table."""
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    section = text[text.index("### 2. Capacity") :].split("\n### ")[0]
    header = next(ln for ln in section.splitlines() if ln.startswith("| sessions"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    cpu_at, kib_at = columns.index("CPU ms per session"), columns.index("KiB per session")
    rows = [
        [c.strip() for c in ln.strip("|").split("|")]
        for ln in section.splitlines()
        if re.match(r"\| \d+ \| gateway \|", ln)
    ]
    assert rows, "no gateway rows in BENCHMARKS.md's capacity table"
    return max(float(r[cpu_at]) for r in rows), max(float(r[kib_at]) for r in rows)


def quantity(text: str) -> float:
    """A Kubernetes CPU (cores) or memory (MiB) quantity."""
    if text.endswith("m"):
        return int(text[:-1]) / 1000
    units = {"Mi": 1.0, "Gi": 1024.0}
    return float(text[:-2]) * units[text[-2:]] if text[-2:] in units else float(text)


@pytest.mark.parametrize("layout", ["native", "pre-1.29"])
def test_sizing_comments_and_resources_follow_the_benchmarks(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_ms, kib = benchmark_figures()
    path = K8S / "deployment.yaml" if layout == "native" else LEGACY
    text = path.read_text(encoding="utf-8")
    comment = re.search(
        r"# Sized from BENCHMARKS\.md \(capacity, worst gateway row\): ([\d.]+) ms CPU and "
        r"([\d.]+) KiB per\s+# 5 s real-time session; at --max-sessions (\d+) that is (\d+)m CPU "
        r"and ([\d.]+) MiB",
        text,
    )
    assert comment, f"{path.name}: no sizing comment"
    gateway = pod_containers(deployments()[layout])["rtts-gateway"]
    sessions = gateway_settings(gateway, monkeypatch).max_sessions
    cpu_cores, memory_mib = sessions * cpu_ms / 5000, sessions * kib / 1024
    assert (float(comment[1]), float(comment[2]), int(comment[3])) == (cpu_ms, kib, sessions)
    assert int(comment[4]) == round(cpu_cores * 1000)
    assert float(comment[5]) == round(memory_mib, 1)
    requests, limits = gateway["resources"]["requests"], gateway["resources"]["limits"]
    assert quantity(requests["cpu"]) >= cpu_cores and quantity(limits["cpu"]) >= 2 * cpu_cores
    # The process itself (about 70 MiB, measured by the image test below) plus the sessions.
    assert quantity(requests["memory"]) >= 70 + memory_mib
    assert quantity(limits["memory"]) >= 2 * (70 + memory_mib)


def test_readme_scaling_figures_follow_the_benchmarks_and_the_manifests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu_ms, kib = benchmark_figures()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**Scaling.**") :]
    section = section[: section.index("\n\n")]
    settings = gateway_settings(container("rtts-gateway"), monkeypatch)
    threshold = float(manifests()["ScaledObject"]["spec"]["triggers"][0]["metadata"]["threshold"])
    per_pod = round(settings.max_sessions * threshold)
    figures = re.search(
        r"([\d.]+) ms of CPU and ([\d.]+) KiB per 5-second real-time session.*?"
        r"`--max-sessions (\d+)` and the target ([\d.]+), a pod carries (\d+) sessions.*?"
        r"(\d+) concurrent calls need (\d+) pods, (\d+) with `prewarm=True`",
        " ".join(section.split()),
    )
    assert figures, section
    assert (float(figures[1]), float(figures[2])) == (cpu_ms, kib)
    assert (int(figures[3]), float(figures[4]), int(figures[5])) == (
        settings.max_sessions,
        threshold,
        per_pod,
    )
    calls = int(figures[6])
    assert int(figures[7]) == math.ceil(calls / per_pod)  # one session per speaking call
    assert int(figures[8]) == math.ceil(2 * calls / per_pod)  # and the prewarmed spare
