"""`jobtide-scaler simulate`: compare the policies on a workload, a trace or all workloads.

JSON output: one object per workload (`{"workload", "tasks", "ideal": {"pod_seconds",
"wait_p95"}, "policies": {name: figures}}`); with several workloads (`--compare` without
`--workload`/`--trace`), a list of those objects in the order of the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jobtide_worker.pipeline_settings import (
    PipelineSettings,
    SettingsError,
    read_settings,
    setting_specs,
)

from jobtide_scaler.settings import ScalerSettings
from jobtide_scaler.simulate.engine import Settings
from jobtide_scaler.simulate.report import Comparison, compare, format_table, plot
from jobtide_scaler.simulate.workloads import WORKLOADS, Workload, make_workload, read_trace

__all__ = ["main", "settings_from_values"]


def _section(values: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    section = values.get(key) or {}
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}{key}: expected a mapping")
    return section


def settings_from_values(
    values: Mapping[str, Any], pipeline: str | None, base: Settings
) -> Settings:
    """Settings from a chart values file: the scaler's settings under `scaler`, and one
    pipeline's keys over `pipelineDefaults` (the only pipeline, or the one named)."""
    pipelines = _section(values, "pipelines", "")
    if pipeline is None and len(pipelines) > 1:
        raise ValueError(f"several pipelines in the values ({', '.join(pipelines)}): name one")
    if pipeline is not None and pipeline not in pipelines:
        raise ValueError(f"pipelines.{pipeline}: not in the values file")
    name = pipeline if pipeline is not None else next(iter(pipelines), None)
    merged = dict(_section(values, "pipelineDefaults", ""))
    if name is not None:
        merged.update(_section(pipelines, name, "pipelines."))
    settings = base
    for block, section, where in (
        (PipelineSettings, merged, f"pipelines.{name}." if name else "pipelineDefaults."),
        (ScalerSettings, _section(values, "scaler", ""), "scaler."),
    ):
        # Only the block's own keys: the rest of the values is not the simulator's business.
        own = {spec.key for spec in setting_specs(block).values()}
        try:
            settings = read_settings(
                Settings,
                {key: value for key, value in section.items() if key in own},
                base=settings,
            )
        except SettingsError as e:
            raise ValueError("; ".join(where + problem for problem in e.problems)) from None
    return settings


def _provisioning(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    try:
        bounds = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError("expected seconds as LOW-HIGH, e.g. 60-120") from None
    if not 0 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError("expected 0 <= LOW <= HIGH")
    return bounds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobtide-scaler simulate",
        description="Replay workloads against jobtide's policy, KEDA ScaledJob, the HPA and the "
        "pattern's original demo, with the same settings (docs/simulator.md).",
    )
    parser.add_argument(
        "--values", type=Path, help="a chart values file (YAML) to take settings from"
    )
    parser.add_argument("--pipeline", help="the pipeline of --values to simulate")
    parser.add_argument("--trace", type=Path, help="CSV: arrival seconds[,duration seconds]")
    parser.add_argument(
        "--node-provisioning",
        type=_provisioning,
        metavar="LOW-HIGH",
        help="with --trace: seconds to bring up a node when the pool is at zero",
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), help="a built-in workload")
    parser.add_argument(
        "--compare", action="store_true", help="all built-in workloads (unless one is named)"
    )
    parser.add_argument("--policy", action="append", help="only these policies (repeatable)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="backlog and workers over time"
    )
    parser.add_argument("--seed", type=int, default=1)
    return parser


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(list(argv))
    try:
        settings = Settings()
        if args.values is not None:
            values = yaml.safe_load(args.values.read_text()) or {}
            if not isinstance(values, Mapping):
                raise ValueError(f"{args.values}: expected a mapping at the top")
            settings = settings_from_values(values, args.pipeline, settings)
        workloads: list[Workload]
        if args.trace is not None:
            workloads = [read_trace(args.trace, args.seed, args.node_provisioning)]
        elif args.workload is not None:
            workloads = [make_workload(args.workload, args.seed)]
        elif args.compare:
            workloads = [make_workload(name, args.seed) for name in WORKLOADS]
        else:
            parser.error("name a --workload or a --trace, or use --compare")
        policies = tuple(args.policy) if args.policy else None
        comparisons = [compare(w, settings, args.seed, policies) for w in workloads]
    except (OSError, ValueError, yaml.YAMLError) as error:
        print(f"simulate: {error}", file=sys.stderr)
        return 2
    _print(comparisons, args.format)
    if args.plot is not None:
        plot(comparisons, args.plot)
    return 0


def _print(comparisons: list[Comparison], output_format: str) -> None:
    if output_format == "json":
        documents = [comparison.as_json() for comparison in comparisons]
        print(json.dumps(documents[0] if len(documents) == 1 else documents, indent=2))
        return
    print("\n\n".join(format_table(comparison) for comparison in comparisons))
