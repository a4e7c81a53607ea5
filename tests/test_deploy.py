"""Deployment files: the gateway image and the Kubernetes sidecar manifests, checked offline."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import ENV_PREFIX, GatewaySettings
from tests.prometheus import require
from tests.support import exchange, start

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "examples" / "kubernetes"
BIN = Path(sys.executable).parent


def manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            docs[doc["kind"]] = doc
    return docs


def container(name: str) -> dict[str, Any]:
    (found,) = [
        c
        for c in manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
        if c["name"] == name
    ]
    return found


def test_dockerfile_passes_hadolint_and_follows_the_rules() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M)[1]  # type: ignore[index]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), f"base image not pinned: {base}"
    assert "RUN sh scripts/install-gateway.sh pip" in dockerfile  # the same steps CI runs below
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


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    files = sorted(str(p) for p in K8S.glob("*.yaml"))
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", *files],
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert (
        "deployment/voice-bot against version" in output
        and "secret/huawei-rtts against version" in output
    )
    assert "ERROR" not in output and "invalid" not in output.lower()
    # Operator resources have no schema in kubernetes-validate: checked by the tests below.
    unchecked = set(re.findall(r"Couldn't find schema for kind (\w+)", output))
    assert unchecked <= {"PodMonitor", "PrometheusRule"}


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


def test_sidecar_manifest_is_consistent() -> None:
    docs = manifests()
    pod = docs["Deployment"]["spec"]["template"]
    gateway, bot = container("rtts-gateway"), container("bot")
    args = gateway["args"]
    env = {e["name"]: e for e in gateway["env"]}
    assert all(
        name.startswith(ENV_PREFIX)
        and name.removeprefix(ENV_PREFIX).lower() in GatewaySettings.model_fields
        for name in env
    )
    drain = float(args[args.index("--drain-timeout") + 1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert gateway["ports"] == [{"name": "metrics", "containerPort": 8766}]
    assert gateway["resources"]["requests"] and gateway["resources"]["limits"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8766"
    secret_keys = set(docs["Secret"]["stringData"])
    for item in [*gateway["env"], *bot["env"]]:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == docs["Secret"]["metadata"]["name"] and ref["key"] in secret_keys
    bot_url = {e["name"]: e.get("value") for e in bot["env"]}["HUAWEI_RTTS_URL"]
    assert bot_url.startswith("ws://127.0.0.1:8765/v1/")
    monitor = docs["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"] == pod["metadata"]["labels"]
    assert monitor["podMetricsEndpoints"][0]["port"] == "metrics"
    assert {"targetLabel": "job", "replacement": "rtts-gateway"} in monitor["podMetricsEndpoints"][
        0
    ]["relabelings"]


def test_gateway_arguments_in_the_manifest_are_accepted() -> None:
    args = container("rtts-gateway")["args"]
    env = {
        "RTTS_GATEWAY_BACKEND": "huawei",
        "RTTS_GATEWAY_REGION": "cn-north-4",
        "RTTS_GATEWAY_PROJECT_ID": "p1",
        "RTTS_GATEWAY_ACCESS_KEY": "ak",
        "RTTS_GATEWAY_SECRET_KEY": "sk",
    }
    code = (
        "from gateway.settings import GatewaySettings; from pydantic_settings import CliApp; import sys; "
        "s = CliApp.run(GatewaySettings, cli_args=sys.argv[1:]); print(s.resolved_backend, s.drain_timeout, s.metrics_host)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["huawei", "20.0", "0.0.0.0"]


@pytest.mark.timeout(600)
async def test_image_install_steps_give_a_working_gateway_without_pipecat(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    await _run(sys.executable, "-m", "venv", str(venv))
    await _run("sh", str(ROOT / "scripts" / "install-gateway.sh"), f"{venv}/bin/python -m pip")
    lean = await asyncio.create_subprocess_exec(
        str(venv / "bin" / "python"), "-c", "import pipecat", stderr=subprocess.DEVNULL
    )
    assert await lean.wait() != 0, "the gateway install must not pull in pipecat"
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
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        base = re.search(r"listening on (ws://\S+)/v1/", line)[1]  # type: ignore[index]
        seen = await exchange(
            f"{base}/v1/image/rtts", start("The image works.", property="english_amy_common")
        )
        assert seen.kinds == ["START", "AUDIO", "END"] and len(seen.audio) > 8000
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0


async def _run(*command: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()[-3000:]


def test_each_manifest_is_one_labelled_resource() -> None:
    # Each file is one resource with the app label, so `kubectl apply -f examples/kubernetes/` is tidy.
    for path in K8S.glob("*.yaml"):
        docs = list(yaml.safe_load_all(path.read_text()))
        assert len(docs) == 1
        assert docs[0]["metadata"]["labels"]["app.kubernetes.io/name"] == "voice-bot", path
    json.dumps(manifests())  # serializable as the API server would take it
