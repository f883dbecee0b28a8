"""Run every policy on a workload and present the figures (JSON, a text table, a plot)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobtide_scaler.simulate.engine import Settings, SimulationResult, simulate
from jobtide_scaler.simulate.ideal import ideal_node_seconds, ideal_pod_seconds, ideal_wait_p95
from jobtide_scaler.simulate.nodes import Levers, NodePool
from jobtide_scaler.simulate.scalers import JOBTIDE_LEVERS, policy_factories
from jobtide_scaler.simulate.workloads import Workload

__all__ = ["Comparison", "compare", "format_table", "plot"]

_NODE_COLUMNS = (
    ("node_seconds", "node-s", "{:.0f}"),
    ("peak_nodes", "peak nodes", "{}"),
    ("nodes_launched", "launched", "{}"),
    ("busy_pods_disrupted", "disrupted", "{}"),
)
_COLUMNS = (
    ("pod_seconds", "pod-s", "{:.0f}"),
    ("idle_pod_seconds", "idle pod-s", "{:.0f}"),
    ("wait_p50", "wait p50", "{:.1f}"),
    ("wait_p95", "wait p95", "{:.1f}"),
    ("wait_p99", "wait p99", "{:.1f}"),
    ("max_backlog", "max backlog", "{}"),
    ("busy_pods_killed", "busy killed", "{}"),
    ("jobs_created", "jobs", "{}"),
)


@dataclass(frozen=True)
class Comparison:
    workload: Workload
    ideal_pod_seconds: float
    ideal_wait_p95: float
    results: dict[str, SimulationResult]
    # The node pool simulated, and the node-level reference at the same wait budget.
    pool: NodePool | None = None
    ideal_node_seconds: float | None = None

    def as_json(self) -> dict[str, Any]:
        ideal: dict[str, float] = {
            "pod_seconds": round(self.ideal_pod_seconds, 1),
            "wait_p95": round(self.ideal_wait_p95, 2),
        }
        if self.ideal_node_seconds is not None:
            ideal["node_seconds"] = round(self.ideal_node_seconds, 1)
        return {
            "workload": self.workload.name,
            "tasks": len(self.workload.tasks),
            "ideal": ideal,
            "policies": {name: self.figures(name) for name in self.results},
        }

    def figures(self, name: str) -> dict[str, float | int]:
        """One policy's figures; the node figures only when a node pool was simulated."""
        figures = self.results[name].metrics.summary()
        if self.pool is None:
            for key, _, _ in _NODE_COLUMNS:
                del figures[key]
        return figures


def compare(
    workload: Workload,
    settings: Settings,
    seed: int,
    policies: tuple[str, ...] | None = None,
    pool: NodePool | None = None,
    jobtide_levers: Levers = JOBTIDE_LEVERS,
) -> Comparison:
    """Every policy (or those named) on the same workload, settings, seed and node pool. The
    ideal costs are computed for the wait budget jobtide achieved (the lowest p95 of the run
    without it)."""
    factories = policy_factories(settings, jobtide_levers)
    names = policies or tuple(factories)
    unknown = [name for name in names if name not in factories]
    if unknown:
        raise ValueError(f"unknown policy {unknown[0]!r}; known: {', '.join(factories)}")
    results = {name: simulate(workload, settings, factories[name](), seed, pool) for name in names}
    if "jobtide" in results:
        budget = results["jobtide"].metrics.wait_p95
    else:
        budget = min(result.metrics.wait_p95 for result in results.values())
    wait_floor = ideal_wait_p95(workload, settings, pool=pool)
    budget = max(budget, wait_floor)
    return Comparison(
        workload=workload,
        ideal_pod_seconds=ideal_pod_seconds(workload, settings, budget),
        ideal_wait_p95=wait_floor,
        results=results,
        pool=pool,
        ideal_node_seconds=None
        if pool is None
        else ideal_node_seconds(workload, settings, pool, budget),
    )


def format_table(comparison: Comparison) -> str:
    columns = _COLUMNS if comparison.pool is None else _NODE_COLUMNS + _COLUMNS
    name_width = max(len(name) for name in comparison.results) + 2
    headers = ["policy".ljust(name_width)] + [f"{title:>11}" for _, title, _ in columns]
    node_reference = (
        ""
        if comparison.ideal_node_seconds is None
        else f"ideal node-s {comparison.ideal_node_seconds:.0f}, "
    )
    lines = [
        f"workload {comparison.workload.name}: {len(comparison.workload.tasks)} tasks; "
        f"{node_reference}ideal pod-s {comparison.ideal_pod_seconds:.0f}, ideal wait p95 "
        f"{comparison.ideal_wait_p95:.1f} s",
        " ".join(headers),
    ]
    for name in comparison.results:
        figures = comparison.figures(name)
        cells = [name.ljust(name_width)] + [
            f"{fmt.format(figures[key]):>11}" for key, _, fmt in columns
        ]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def plot(comparisons: list[Comparison], path: Path) -> None:
    """Backlog (ready messages), workers and nodes over time, one row per workload, one line
    per policy. matplotlib is imported here only: the scaler itself never needs it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, int]] = [("ready messages", 1), ("worker pods", 2), ("nodes", 3)]
    if all(comparison.pool is None for comparison in comparisons):
        panels = panels[:2]
    figure, axes = plt.subplots(
        len(comparisons),
        len(panels),
        figsize=(6 * len(panels), 3 * len(comparisons)),
        squeeze=False,
    )
    for row, comparison in zip(axes, comparisons, strict=True):
        for axis, (title, column) in zip(row, panels, strict=True):
            for name, result in comparison.results.items():
                times = [point[0] / 60 for point in result.timeline]
                values = [point[column] for point in result.timeline]
                axis.step(times, values, label=name, lw=0.8)
            axis.set_title(f"{comparison.workload.name}: {title}")
            axis.set_xlabel("minutes")
    axes[0][-1].legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=70)
    plt.close(figure)
