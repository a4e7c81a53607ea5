"""Write prometheusrule.yaml (Prometheus Operator) from grafana/alerts.yml, the one source.

python examples/kubernetes/generate_prometheusrule.py          # rewrite it
python examples/kubernetes/generate_prometheusrule.py --check  # exit 1 if stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "grafana" / "alerts.yml"
OUTPUT = HERE / "prometheusrule.yaml"
HEADER = "# Generated from grafana/alerts.yml by generate_prometheusrule.py; do not edit by hand.\n"


def render() -> str:
    """The PrometheusRule manifest wrapping the alert groups unchanged."""
    groups = yaml.safe_load(SOURCE.read_text(encoding="utf-8"))["groups"]
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "rtts-gateway", "labels": {"app.kubernetes.io/name": "voice-bot"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(manifest, sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    """Write the manifest, or with --check report whether the committed one is current."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check the committed file")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
