"""`jobtide-scaler simulate`: compare the policies on a workload, a trace or all workloads.

JSON output: one object per workload (`{"workload", "tasks", "ideal": {"node_seconds",
"pod_seconds", "wait_p95"}, "policies": {name: figures}}`); with several workloads
(`--compare` without `--workload`/`--trace`), a list of those objects in the order of the
table. Without a node pool (`--autoscaler none`) the node figures are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jobtide_worker import priority
from jobtide_worker.pipeline_settings import (
    PipelineSettings,
    SettingsError,
    read_settings,
    setting_specs,
)

from jobtide_scaler.settings import ScalerSettings
from jobtide_scaler.simulate.engine import Metrics, Settings
from jobtide_scaler.simulate.nodes import (
    Autoscaler,
    Consolidation,
    Levers,
    NodePool,
    requests_from_resources,
    with_requests,
)
from jobtide_scaler.simulate.report import Comparison, compare, format_table, plot
from jobtide_scaler.simulate.scalers import JOBTIDE_LEVERS
from jobtide_scaler.simulate.sweep import bill
from jobtide_scaler.simulate.tune import Tuning, TuningConfig, tune
from jobtide_scaler.simulate.workloads import WORKLOADS, Workload, make_workload, read_trace

__all__ = [
    "levers_from_values",
    "main",
    "pool_from_values",
    "settings_from_values",
]


def _section(values: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    section = values.get(key) or {}
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}{key}: expected a mapping")
    return section


def _pipeline(values: Mapping[str, Any], pipeline: str | None) -> tuple[dict[str, Any], str]:
    """One pipeline's keys over `pipelineDefaults` (the only pipeline, or the one named), and
    where they are, for error messages."""
    pipelines = _section(values, "pipelines", "")
    if pipeline is None and len(pipelines) > 1:
        raise ValueError(f"several pipelines in the values ({', '.join(pipelines)}): name one")
    if pipeline is not None and pipeline not in pipelines:
        raise ValueError(f"pipelines.{pipeline}: not in the values file")
    name = pipeline if pipeline is not None else next(iter(pipelines), None)
    merged = dict(_section(values, "pipelineDefaults", ""))
    if name is not None:
        merged.update(_section(pipelines, name, "pipelines."))
    return merged, f"pipelines.{name}." if name else "pipelineDefaults."


def settings_from_values(
    values: Mapping[str, Any], pipeline: str | None, base: Settings
) -> Settings:
    """Settings from a chart values file: the scaler's settings under `scaler`, and one
    pipeline's keys over `pipelineDefaults` (the only pipeline, or the one named)."""
    merged, where_pipeline = _pipeline(values, pipeline)
    settings = base
    for block, section, where in (
        (PipelineSettings, merged, where_pipeline),
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


def pool_from_values(values: Mapping[str, Any], pipeline: str | None, base: NodePool) -> NodePool:
    """The worker pod's requests from the pipeline's `resources` (requests, else limits);
    the node shape and autoscaler stay the command's."""
    merged, where = _pipeline(values, pipeline)
    resources = merged.get("resources") or {}
    if not isinstance(resources, Mapping):
        raise ValueError(f"{where}resources: expected a mapping")
    return with_requests(base, *requests_from_resources(resources, f"{where}resources."))


def levers_from_values(values: Mapping[str, Any], pipeline: str | None) -> Levers:
    """jobtide's levers as the values set them: the packing affinity (`nodePool.packWorkers`,
    replaced by any affinity of `nodePool` or the pipeline's `podTemplate.spec`, which packs
    only if it has a `podAffinity`), the pods' annotations (`nodePool.podAnnotations` under
    the pipeline's `podTemplate.metadata.annotations`), the worker's consumer priority
    (`JOBTIDE_CONSUMER_PRIORITY` in the pipeline's `env`, `node` by default) and whether a
    Job retries an evicted pod (`backoffLimit` above 0; the chart's default is 0)."""
    merged, where = _pipeline(values, pipeline)
    node_pool = _section(values, "nodePool", "")
    template = _section(merged, "podTemplate", where)
    affinity = _section(_section(template, "spec", f"{where}podTemplate."), "affinity", "") or (
        _section(node_pool, "affinity", "nodePool.")
    )
    pack = "podAffinity" in affinity if affinity else bool(node_pool.get("packWorkers", True))
    annotations = dict(_section(node_pool, "podAnnotations", "nodePool.") or {})
    if "podAnnotations" not in node_pool:
        annotations = {
            "karpenter.sh/do-not-disrupt": "true",
            "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
        }
    annotations.update(_section(_section(template, "metadata", ""), "annotations", ""))
    backoff_limit = merged.get("backoffLimit", 0)
    if isinstance(backoff_limit, bool) or not isinstance(backoff_limit, int) or backoff_limit < 0:
        raise ValueError(f"{where}backoffLimit: expected a count, got {backoff_limit!r}")
    consumer_priority = JOBTIDE_LEVERS.consumer_priority
    for variable in merged.get("env") or []:
        if isinstance(variable, Mapping) and variable.get("name") == "JOBTIDE_CONSUMER_PRIORITY":
            consumer_priority = str(variable.get("value", "")).strip().lower()
            if consumer_priority not in priority.MODES:
                raise ValueError(
                    f"{where}env: JOBTIDE_CONSUMER_PRIORITY: expected one of "
                    f"{', '.join(priority.MODES)}, got {variable.get('value')!r}"
                )
    return Levers(
        consumer_priority=consumer_priority,
        pack=pack,
        karpenter_do_not_disrupt=str(annotations.get("karpenter.sh/do-not-disrupt")).lower()
        == "true",
        ca_safe_to_evict=str(
            annotations.get("cluster-autoscaler.kubernetes.io/safe-to-evict")
        ).lower()
        != "false",
        evicted_pod_retried=backoff_limit > 0,
        finished_pods_deleted=True,  # the chart's Jobs always carry ttlSecondsAfterFinished
    )


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
    pool = NodePool()
    nodes = parser.add_argument_group("node pool (docs/simulator.md)")
    nodes.add_argument(
        "--autoscaler",
        choices=[a.value for a in Autoscaler] + ["none"],
        default=pool.autoscaler.value,
        help="the node autoscaler; none: pods only, on a pool that is always warm (or, with "
        "--node-provisioning, cold after 10 minutes without pods)",
    )
    nodes.add_argument(
        "--consolidation",
        choices=[c.value for c in Consolidation],
        default=pool.consolidation.value,
        help="Karpenter's consolidationPolicy",
    )
    nodes.add_argument(
        "--consolidate-after",
        type=float,
        default=pool.consolidate_after_seconds,
        metavar="SECONDS",
        help="Karpenter's consolidateAfter",
    )
    nodes.add_argument(
        "--node-provisioning",
        type=_provisioning,
        metavar="LOW-HIGH",
        help=f"seconds from a node's launch to its readiness (default "
        f"{pool.provisioning_seconds[0]:.0f}-{pool.provisioning_seconds[1]:.0f})",
    )
    nodes.add_argument(
        "--node-termination",
        type=float,
        default=pool.termination_seconds,
        metavar="SECONDS",
        help="seconds a node is still billed after the autoscaler decided to remove it (its "
        "drain and the instance's deletion)",
    )
    nodes.add_argument("--node-cpu", type=float, default=pool.node_cpu, help="allocatable CPUs")
    nodes.add_argument(
        "--node-memory", type=float, default=pool.node_memory_gib, help="allocatable GiB"
    )
    nodes.add_argument("--node-max-pods", type=int, default=pool.node_max_pods)
    nodes.add_argument(
        "--pod-cpu",
        type=float,
        help=f"a worker's CPU request (default: the pipeline's in --values, else {pool.pod_cpu})",
    )
    nodes.add_argument(
        "--pod-memory",
        type=float,
        help=f"a worker's memory request in GiB (default: the pipeline's, else "
        f"{pool.pod_memory_gib})",
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), help="a built-in workload")
    parser.add_argument(
        "--compare", action="store_true", help="all built-in workloads (unless one is named)"
    )
    parser.add_argument("--policy", action="append", help="only these policies (repeatable)")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="search the cheapest messagesPerWorker and idleTimeoutSeconds for the workload or "
        "trace, at a p95 wait no longer than the current settings' (or --max-wait-p95)",
    )
    parser.add_argument(
        "--max-wait-p95",
        type=float,
        metavar="SECONDS",
        help="with --tune: the longest p95 wait a tuning may have",
    )
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="backlog, workers and nodes over time"
    )
    parser.add_argument("--seed", type=int, default=1)
    return parser


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(list(argv))
    try:
        settings = Settings()
        pool = _pool(args)
        levers = JOBTIDE_LEVERS
        # Where the pipeline's keys go in the values (`--tune` prints its answer there).
        values_path = f"pipelines.{args.pipeline}" if args.pipeline else "pipelineDefaults"
        if args.values is not None:
            values = yaml.safe_load(args.values.read_text()) or {}
            if not isinstance(values, Mapping):
                raise ValueError(f"{args.values}: expected a mapping at the top")
            settings = settings_from_values(values, args.pipeline, settings)
            levers = levers_from_values(values, args.pipeline)
            values_path = _pipeline(values, args.pipeline)[1].rstrip(".")
            if pool is not None:
                pool = pool_from_values(values, args.pipeline, pool)
        if pool is not None:
            pool = with_requests(pool, args.pod_cpu, args.pod_memory)
        workloads: list[Workload]
        if args.trace is not None:
            provisioning = args.node_provisioning if pool is None else None
            workloads = [read_trace(args.trace, args.seed, provisioning)]
        elif args.workload is not None:
            workloads = [make_workload(args.workload, args.seed)]
        elif args.compare:
            workloads = [make_workload(name, args.seed) for name in WORKLOADS]
        else:
            parser.error("name a --workload or a --trace, or use --compare")
        if args.tune:
            if len(workloads) != 1 or args.policy or args.plot is not None:
                parser.error("--tune takes one --workload or --trace, without --policy or --plot")
            tuning = tune(workloads[0], settings, pool, levers, args.seed, args.max_wait_p95)
            _print_tuning(workloads[0], tuning, pool, values_path, args.format)
            return 0
        if args.max_wait_p95 is not None:
            parser.error("--max-wait-p95 applies to --tune only")
        policies = tuple(args.policy) if args.policy else None
        comparisons = [compare(w, settings, args.seed, policies, pool, levers) for w in workloads]
    except (OSError, ValueError, yaml.YAMLError) as error:
        print(f"simulate: {error}", file=sys.stderr)
        return 2
    _print(comparisons, args.format)
    if args.plot is not None:
        plot(comparisons, args.plot)
    return 0


def _pool(args: argparse.Namespace) -> NodePool | None:
    if args.autoscaler == "none":
        return None
    changes: dict[str, Any] = {
        "autoscaler": Autoscaler(args.autoscaler),
        "consolidation": Consolidation(args.consolidation),
        "consolidate_after_seconds": args.consolidate_after,
        "termination_seconds": args.node_termination,
        "node_cpu": args.node_cpu,
        "node_memory_gib": args.node_memory,
        "node_max_pods": args.node_max_pods,
    }
    if args.node_provisioning is not None:
        changes["provisioning_seconds"] = args.node_provisioning
    return NodePool(**changes)


def _print(comparisons: list[Comparison], output_format: str) -> None:
    if output_format == "json":
        documents = [comparison.as_json() for comparison in comparisons]
        print(json.dumps(documents[0] if len(documents) == 1 else documents, indent=2))
        return
    print("\n\n".join(format_table(comparison) for comparison in comparisons))


def _print_tuning(
    workload: Workload, tuning: Tuning, pool: NodePool | None, path: str, output_format: str
) -> None:
    unit = "pod-s" if pool is None else "node-s"
    cost = bill(pool)

    def figures(found: tuple[TuningConfig, Metrics]) -> dict[str, Any]:
        config, metrics = found
        return {"values": config.values(), "figures": metrics.summary()}

    if output_format == "json":
        document = {
            "workload": workload.name,
            "wait_limit": round(tuning.wait_limit, 1),
            "runs": tuning.runs,
            "current": figures(tuning.current),
            "best": None if tuning.best is None else figures(tuning.best),
            "values_path": path,
        }
        print(json.dumps(document, indent=2))
        return

    def line(found: tuple[TuningConfig, Metrics]) -> str:
        config, metrics = found
        keys = ", ".join(f"{key} {value}" for key, value in config.values().items())
        return f"{keys}: {cost(metrics):.0f} {unit}, p95 wait {metrics.wait_p95:.1f} s"

    print(f"tuning on {workload.name} ({tuning.runs} runs)")
    print(f"  current settings: {line(tuning.current)}")
    if tuning.best is None:
        print(f"  no tuning waits {tuning.wait_limit:.1f} s or less at p95")
        return
    change = cost(tuning.best[1]) / cost(tuning.current[1]) - 1
    if tuning.best[0] == tuning.current[0]:
        print(f"  the current settings are the cheapest at p95 <= {tuning.wait_limit:.1f} s")
        return
    print(f"  cheapest at p95 <= {tuning.wait_limit:.1f} s: {line(tuning.best)} ({change:+.1%})")
    print("values:")
    snippet: dict[str, Any] = tuning.best[0].values()
    for key in reversed(path.split(".")):
        snippet = {key: snippet}
    print(textwrap.indent(yaml.safe_dump(snippet, sort_keys=False), "  "), end="")
