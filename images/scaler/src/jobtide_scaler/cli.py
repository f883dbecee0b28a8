"""Command-line arguments."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="jobtide-scaler",
        description="Create just enough Kubernetes Jobs for each queue's backlog.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the scaling loop")
    run.add_argument(
        "--config",
        type=Path,
        required=True,
        help="the configuration file (YAML; docs/architecture.md)",
    )
    run.add_argument("--once", action="store_true", help="run one cycle and exit")
    run.add_argument(
        "--dry-run", action="store_true", help="decide and log, but create and delete nothing"
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    commands.add_parser(
        "status",
        add_help=False,
        help="the release's pipelines, workers, decisions and leader (see status --help)",
    ).add_argument("status_args", nargs=argparse.REMAINDER)

    simulate = commands.add_parser(
        "simulate",
        add_help=False,
        help="replay workloads against this policy, KEDA and the HPA (see simulate --help)",
    )
    simulate.add_argument("simulate_args", nargs=argparse.REMAINDER)

    commands.add_parser(
        "annotate",
        add_help=False,
        help="set one annotation on named pods (the chart's pre-delete hook; see annotate --help)",
    ).add_argument("annotate_args", nargs=argparse.REMAINDER)
    return parser.parse_args(list(argv))
