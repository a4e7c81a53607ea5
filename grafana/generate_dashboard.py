"""Build the gateway's Grafana dashboard with grafana-foundation-sdk (Grafana 11.6 schema).

The dashboard is code so that every panel is checked against Grafana's own model; the JSON
in ``grafana/dashboards/`` is this script's output, and a test checks they are equal.

    python grafana/generate_dashboard.py          # rewrite grafana/dashboards/rtts-gateway.json
    python grafana/generate_dashboard.py --check  # exit 1 if the committed JSON is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "rtts-gateway.json"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
SELECT = 'instance=~"$instance"'
SELECT_VOICE = 'instance=~"$instance", voice=~"$voice"'
# Outcomes that are failures; client_cancelled is a caller barging in, which is normal.
FAILED = 'outcome=~"error|fatal|upstream_closed|timeout|handshake_failed|rejected"'
TTFA_SLO_SECONDS = 1.0
ALL = dm.VariableOption(selected=True, text=["All"], value=["$__all"])


@dataclass(frozen=True)
class Query:
    """One PromQL target and its legend."""

    expr: str
    legend: str


def _steps(*steps: tuple[float | None, str]) -> gd.ThresholdsConfig:
    return (
        gd.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=color) for value, color in steps])
    )


def _targets(panel: Any, queries: list[Query]) -> Any:
    for ref, query in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(
            prometheus.Dataquery()
            .expr(query.expr)
            .legend_format(query.legend)
            .ref_id(ref)
            .datasource(DATASOURCE)
        )
    return panel


def series(
    title: str,
    description: str,
    unit: str,
    queries: list[Query],
    *,
    thresholds: gd.ThresholdsConfig | None = None,
) -> timeseries.Panel:
    """A time-series panel."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .thresholds(thresholds or _steps((None, "green")))
        .fill_opacity(10)
    )
    return _targets(panel, queries)


def single(
    title: str, description: str, unit: str, query: Query, thresholds: gd.ThresholdsConfig
) -> stat.Panel:
    """A single-value panel."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .thresholds(thresholds)
    )
    return _targets(panel, [query])


def quantiles(metric: str, selector: str) -> list[Query]:
    """p50, p95 and p99 of a histogram, over the dashboard's rate interval."""
    return [
        Query(
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
            f"p{int(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def panels() -> list[tuple[str, list[tuple[Any, int, int]]]]:
    """Rows of (panel, width, height)."""
    latency = _steps((None, "green"), (TTFA_SLO_SECONDS * 0.5, "yellow"), (TTFA_SLO_SECONDS, "red"))
    return [
        (
            "Health",
            [
                (
                    single(
                        "Gateways up",
                        "Scraped gateway processes that answer (Prometheus' up).",
                        "none",
                        Query(f"sum(up{{{SELECT}}})", "up"),
                        _steps((None, "red"), (1, "green")),
                    ),
                    4,
                    4,
                ),
                (
                    single(
                        "Gateways ready",
                        "Gateways that can take sessions (/readyz): listening, engine loaded, not "
                        "draining. The upstream's reachability does not count: see the next panel.",
                        "none",
                        Query(f"sum(rtts_gateway_ready{{{SELECT}}})", "ready"),
                        _steps((None, "red"), (1, "green")),
                    ),
                    4,
                    4,
                ),
                (
                    single(
                        "Upstreams reachable",
                        "Share of gateways whose last TCP probe of their upstream (Huawei Cloud, "
                        "--upstream-url or the local engine) connected; below 100% new sessions "
                        "fail or go to the fallback (alert RttsUpstreamUnreachable).",
                        "percentunit",
                        Query(f"avg(rtts_upstream_reachable{{{SELECT}}})", "reachable"),
                        _steps((None, "red"), (0.999, "green")),
                    ),
                    4,
                    4,
                ),
                (
                    single(
                        "Active sessions",
                        "Sessions in progress now, all selected gateways.",
                        "none",
                        Query(f"sum(rtts_active_sessions{{{SELECT}}})", "active"),
                        _steps((None, "green")),
                    ),
                    4,
                    4,
                ),
                (
                    single(
                        "Error ratio (5m)",
                        "Share of sessions that failed (client hang-ups excluded), last 5 minutes.",
                        "percentunit",
                        Query(
                            f"sum(rate(rtts_sessions_total{{{SELECT_VOICE}, {FAILED}}}[5m])) / sum(rate(rtts_sessions_total{{{SELECT_VOICE}}}[5m]))",
                            "errors",
                        ),
                        _steps((None, "green"), (0.01, "yellow"), (0.05, "red")),
                    ),
                    4,
                    4,
                ),
                (
                    single(
                        "Time to first audio p95 (5m)",
                        f"95th percentile of START to first audio byte; the SLO is {TTFA_SLO_SECONDS:g} s.",
                        "s",
                        Query(
                            f"histogram_quantile(0.95, sum by (le) (rate(rtts_time_to_first_audio_seconds_bucket{{{SELECT_VOICE}}}[5m])))",
                            "p95",
                        ),
                        latency,
                    ),
                    4,
                    4,
                ),
            ],
        ),
        (
            "Traffic",
            [
                (
                    series(
                        "Sessions per second by outcome",
                        "Finished sessions per second, by how they ended.",
                        "reqps",
                        [
                            Query(
                                f"sum by (outcome) (rate(rtts_sessions_total{{{SELECT_VOICE}}}[$__rate_interval]))",
                                "{{outcome}}",
                            )
                        ],
                    ),
                    12,
                    8,
                ),
                (
                    series(
                        "Errors per second by code",
                        "Failed sessions per second by Huawei code, http_<status>, network or timeout.",
                        "reqps",
                        [
                            Query(
                                f'sum by (code) (rate(rtts_errors_total{{{SELECT}, outcome!="client_cancelled"}}[$__rate_interval]))',
                                "{{code}}",
                            )
                        ],
                    ),
                    12,
                    8,
                ),
                (
                    series(
                        "Error ratio",
                        "Share of sessions that failed (client hang-ups excluded).",
                        "percentunit",
                        [
                            Query(
                                f"sum(rate(rtts_sessions_total{{{SELECT_VOICE}, {FAILED}}}[$__rate_interval])) / sum(rate(rtts_sessions_total{{{SELECT_VOICE}}}[$__rate_interval]))",
                                "error ratio",
                            )
                        ],
                        thresholds=_steps((None, "green"), (0.01, "yellow"), (0.05, "red")),
                    ),
                    12,
                    8,
                ),
                (
                    series(
                        "Active sessions and limit",
                        "Sessions in progress against --max-sessions; at the limit new ones get 429. "
                        "Spares: upstream connections open ahead of sessions (--upstream-spares).",
                        "none",
                        [
                            Query(f"sum(rtts_active_sessions{{{SELECT}}})", "active"),
                            Query(f"sum(rtts_sessions_limit{{{SELECT}}})", "limit"),
                            Query(f"sum(rtts_upstream_spares{{{SELECT}}})", "spares"),
                        ],
                    ),
                    12,
                    8,
                ),
            ],
        ),
        (
            "Latency",
            [
                (
                    series(
                        "Time to first audio",
                        "From the client's START to the first audio byte: what a caller waits for.",
                        "s",
                        quantiles("rtts_time_to_first_audio_seconds", SELECT_VOICE),
                        thresholds=latency,
                    ),
                    12,
                    8,
                ),
                (
                    series(
                        "Time to START",
                        "From the client's START to the server's START (request accepted).",
                        "s",
                        quantiles("rtts_time_to_start_seconds", SELECT_VOICE),
                        thresholds=latency,
                    ),
                    12,
                    8,
                ),
                (
                    series(
                        "Upstream connect time",
                        "Opening the upstream WebSocket, TLS and authentication included.",
                        "s",
                        quantiles("rtts_upstream_connect_seconds", SELECT),
                        thresholds=latency,
                    ),
                    8,
                    8,
                ),
                (
                    series(
                        "Session duration",
                        "From the client's connection to its close.",
                        "s",
                        quantiles("rtts_session_duration_seconds", SELECT),
                    ),
                    8,
                    8,
                ),
                (
                    series(
                        "Real-time factor",
                        "Synthesis time divided by audio duration; above 1 the audio comes slower than it plays.",
                        "none",
                        quantiles("rtts_real_time_factor", SELECT_VOICE),
                        thresholds=_steps((None, "green"), (0.5, "yellow"), (1, "red")),
                    ),
                    8,
                    8,
                ),
            ],
        ),
        (
            "Circuit breakers and failover",
            [
                (
                    series(
                        "Upstream circuit breakers",
                        "Breaker state of each upstream: 0 closed (in use), 1 half-open (trial "
                        "sessions after a good probe), 2 open (skipped: failover or 503 at once).",
                        "none",
                        [
                            Query(
                                f"max by (upstream) (rtts_upstream_breaker_state{{{SELECT}}})",
                                "{{upstream}}",
                            )
                        ],
                        thresholds=_steps((None, "green"), (1, "yellow"), (2, "red")),
                    ),
                    12,
                    8,
                ),
                (
                    series(
                        "Sessions by upstream",
                        "Sessions per second relayed to each upstream: primary, the second "
                        "upstream (--secondary-url) or the local engine (--fallback local); "
                        "refused: answered 503 at once because every breaker was open.",
                        "reqps",
                        [
                            Query(
                                f"sum by (upstream) (rate(rtts_upstream_sessions_total{{{SELECT}}}[$__rate_interval]))",
                                "{{upstream}}",
                            ),
                            Query(
                                f"sum(rate(rtts_sessions_refused_fast_total{{{SELECT}}}[$__rate_interval]))",
                                "refused (circuit open)",
                            ),
                        ],
                    ),
                    12,
                    8,
                ),
                (
                    series(
                        "Breaker transitions and probes",
                        "Transitions by upstream and state entered, and handshake-only probes "
                        "of open breakers by result, per interval.",
                        "none",
                        [
                            Query(
                                f"sum by (upstream, state) (increase(rtts_upstream_breaker_transitions_total{{{SELECT}}}[$__rate_interval]))",
                                "{{upstream}} → {{state}}",
                            ),
                            Query(
                                f"sum by (upstream, result) (increase(rtts_upstream_breaker_probes_total{{{SELECT}}}[$__rate_interval]))",
                                "probe {{upstream}} {{result}}",
                            ),
                        ],
                    ),
                    24,
                    8,
                ),
            ],
        ),
        (
            "Volume and cost",
            [
                (
                    series(
                        "Audio seconds produced per second",
                        "Seconds of audio relayed per second (PCM and G.711).",
                        "s",
                        [
                            Query(
                                f"sum by (voice) (rate(rtts_audio_seconds_total{{{SELECT_VOICE}}}[$__rate_interval]))",
                                "{{voice}}",
                            )
                        ],
                    ),
                    12,
                    8,
                ),
                (
                    series(
                        "Characters per second (cost)",
                        "Characters sent for synthesis per second, by voice: what Huawei bills.",
                        "cps",
                        [
                            Query(
                                f"sum by (voice) (rate(rtts_text_characters_total{{{SELECT_VOICE}}}[$__rate_interval]))",
                                "{{voice}}",
                            )
                        ],
                    ),
                    12,
                    8,
                ),
            ],
        ),
    ]


def build() -> gd.Dashboard:
    """The dashboard builder, laid out row by row on Grafana's 24-column grid."""
    board = (
        gd.Dashboard("Huawei rtts gateway")
        .uid("rtts-gateway")
        .description("Speed, health and cost of Huawei real-time TTS through rtts-gateway.")
        .tags(["rtts", "tts", "voice"])
        .refresh("30s")
        .time("now-1h", "now")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            gd.QueryVariable("instance")
            .label("Gateway")
            .datasource(DATASOURCE)
            .query("label_values(rtts_gateway_build_info, instance)")
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(ALL)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
        )
        .with_variable(
            gd.QueryVariable("voice")
            .label("Voice")
            .datasource(DATASOURCE)
            .query("label_values(rtts_sessions_total, voice)")
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(ALL)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
        )
    )
    y, panel_id = 0, 0
    for title, row in panels():
        panel_id += 1
        board = board.with_row(gd.Row(title).id(panel_id).grid_pos(dm.GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        x, row_height = 0, 0
        for panel, width, height in row:
            if x + width > 24:
                x, y = 0, y + row_height
                row_height = 0
            panel_id += 1
            board = board.with_panel(
                panel.id(panel_id).grid_pos(dm.GridPos(h=height, w=width, x=x, y=y))
            )
            x += width
            row_height = max(row_height, height)
        y += row_height
    return board


def render() -> str:
    """The dashboard as Grafana JSON, stable byte for byte."""
    data = json.loads(JSONEncoder().encode(build().build()))
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the JSON, or with --check report whether the committed one is current."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check the committed JSON")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run python grafana/generate_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
