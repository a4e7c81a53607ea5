"""grafana/: the dashboard, alert rules, Prometheus config and provisioning, checked for real.

promtool checks the config and rules and runs the alert unit tests; a real Prometheus scrapes
a gateway carrying generated traffic, and every dashboard query and alert expression runs
against it.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from gateway.server import RunningGateway
from gateway.traffic import generate
from tests.prometheus import require, running_prometheus

GRAFANA = Path(__file__).resolve().parents[1] / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "rtts-gateway.json").read_text(encoding="utf-8"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("promtool"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=GRAFANA,
    )


def panel_queries() -> list[tuple[str, str]]:
    return [
        (p["title"], t["expr"])
        for p in DASHBOARD["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]


def substitute(expr: str) -> str:
    """The query as Grafana would send it with every variable on All."""
    return expr.replace("$instance", ".*").replace("$voice", ".*").replace("$__rate_interval", "1m")


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((GRAFANA / "alerts.yml").read_text(encoding="utf-8"))
    return [(r["alert"], r["expr"]) for group in rules["groups"] for r in group["rules"]]


def test_prometheus_config_and_rules_pass_promtool() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_has_summary_description_and_severity_and_a_firing_test() -> None:
    rules = yaml.safe_load((GRAFANA / "alerts.yml").read_text(encoding="utf-8"))["groups"][0][
        "rules"
    ]
    tests = (GRAFANA / "alerts.test.yml").read_text(encoding="utf-8")
    names = {rule["alert"] for rule in rules}
    assert names == {
        "RttsGatewayDown",
        "RttsGatewayNotReady",
        "RttsUpstreamUnreachable",
        "RttsHighErrorRatio",
        "RttsSlowFirstAudio",
        "RttsSessionsNearLimit",
        "RttsAuthenticationFailing",
        "RttsUpstreamCircuitOpen",
        "RttsServingFromFallback",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80
        assert tests.count(f"alertname: {rule['alert']}") >= 2  # firing and not firing


def test_committed_dashboard_is_the_generators_output() -> None:
    result = subprocess.run(
        [sys.executable, str(GRAFANA / "generate_dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_dashboard_is_valid_for_grafanas_own_model() -> None:
    register_default_plugins()
    model = Dashboard.from_json(DASHBOARD)
    assert model.uid == "rtts-gateway" and len(model.panels or []) == len(DASHBOARD["panels"])
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource"
        and variables["datasource"]["query"] == "prometheus"
    )
    assert {"instance", "voice"} <= set(variables)


def test_dashboard_structure() -> None:
    panels = DASHBOARD["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for panel in panels:
        assert panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        boxes.append(
            (panel["title"], grid["x"], grid["y"], grid["x"] + grid["w"], grid["y"] + grid["h"])
        )
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(
            t["expr"] and t["datasource"] == panel["datasource"] for t in panel["targets"]
        )
        assert panel["description"] and panel["fieldConfig"]["defaults"]["unit"]
        assert panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    for i, (name, x1, y1, x2, y2) in enumerate(boxes):
        for other, a1, b1, a2, b2 in boxes[i + 1 :]:
            assert x2 <= a1 or a2 <= x1 or y2 <= b1 or b2 <= y1, f"{name!r} overlaps {other!r}"


def test_dashboard_has_the_panels_operators_need() -> None:
    titles = {p["title"] for p in DASHBOARD["panels"]}
    for wanted in (
        "Sessions per second by outcome",
        "Errors per second by code",
        "Error ratio",
        "Time to first audio",
        "Time to START",
        "Upstream connect time",
        "Session duration",
        "Real-time factor",
        "Active sessions and limit",
        "Audio seconds produced per second",
        "Characters per second (cost)",
        "Gateways up",
        "Gateways ready",
        "Upstream circuit breakers",
        "Sessions by upstream",
        "Breaker transitions and probes",
        "Upstreams reachable",
    ):
        assert wanted in titles
    quantile_exprs = [e for t, e in panel_queries() if t == "Time to first audio"]
    assert [re.search(r"histogram_quantile\((0\.\d+)", e)[1] for e in quantile_exprs] == [
        "0.5",
        "0.95",
        "0.99",
    ]  # type: ignore[index]


def test_provisioning_files_follow_grafanas_format() -> None:
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["url"]
    dashboards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "rtts.yml").read_text())
    (provider,) = dashboards["providers"]
    assert (
        dashboards["apiVersion"] == 1
        and provider["type"] == "file"
        and provider["options"]["path"].startswith("/")
    )


async def test_every_query_and_alert_runs_against_a_real_prometheus(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    target = gateway.metrics_url.removeprefix("http://")
    async with running_prometheus(
        tmp_path, [target], rule_files=[GRAFANA / "alerts.yml"]
    ) as prometheus:
        assert await prometheus.wait_for('up{job="rtts-gateway"}', 1) == 1
        outcomes = await generate(gateway.url(), total=60, concurrency=4, pause=0.05)
        assert outcomes["END"] > 30 and outcomes["ERROR"] >= 5 and outcomes["hung_up"] >= 1
        await asyncio.sleep(1.5)  # a few more scrapes, so rates have two points
        empty: list[str] = []
        for title, expr in panel_queries():
            result = await prometheus.query(substitute(expr))
            values = [float(r["value"][1]) for r in result]  # type: ignore[index]
            if not [v for v in values if v == v]:  # NaN-only counts as no data
                empty.append(f"{title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
        for _name, expr in alert_expressions():
            await prometheus.query(expr)  # raises on a PromQL error
        rules = await _rules(prometheus.url)
        assert {r["name"] for r in rules} >= {name for name, _ in alert_expressions()}
        assert all(r["health"] == "ok" for r in rules), rules


async def _rules(url: str) -> list[dict[str, Any]]:
    import aiohttp

    for _ in range(40):
        async with aiohttp.ClientSession() as http, http.get(f"{url}/api/v1/rules") as response:
            groups = (await response.json())["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(r.get("health") in ("ok", "err") for r in rules):
            return rules
        await asyncio.sleep(0.25)
    pytest.fail("Prometheus did not evaluate the alert rules")
