"""Run every policy on a workload and present the figures (JSON, a text table, a plot)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobtide_scaler.simulate.engine import Settings, SimulationResult, simulate
from jobtide_scaler.simulate.ideal import ideal_pod_seconds, ideal_wait_p95
from jobtide_scaler.simulate.scalers import policy_factories
from jobtide_scaler.simulate.workloads import Workload

__all__ = ["Comparison", "compare", "format_table", "plot"]

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

    def as_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload.name,
            "tasks": len(self.workload.tasks),
            "ideal": {
                "pod_seconds": round(self.ideal_pod_seconds, 1),
                "wait_p95": round(self.ideal_wait_p95, 2),
            },
            "policies": {name: r.metrics.summary() for name, r in self.results.items()},
        }


def compare(
    workload: Workload,
    settings: Settings,
    seed: int,
    policies: tuple[str, ...] | None = None,
) -> Comparison:
    """Every policy (or those named) on the same workload, settings and seed. The ideal cost
    is computed for the wait budget jobtide achieved (the lowest p95 of the run without it)."""
    factories = policy_factories(settings)
    names = policies or tuple(factories)
    unknown = [name for name in names if name not in factories]
    if unknown:
        raise ValueError(f"unknown policy {unknown[0]!r}; known: {', '.join(factories)}")
    results = {name: simulate(workload, settings, factories[name](), seed) for name in names}
    if "jobtide" in results:
        budget = results["jobtide"].metrics.wait_p95
    else:
        budget = min(result.metrics.wait_p95 for result in results.values())
    wait_floor = ideal_wait_p95(workload, settings)
    return Comparison(
        workload=workload,
        ideal_pod_seconds=ideal_pod_seconds(workload, settings, max(budget, wait_floor)),
        ideal_wait_p95=wait_floor,
        results=results,
    )


def format_table(comparison: Comparison) -> str:
    name_width = max(len(name) for name in comparison.results) + 2
    headers = ["policy".ljust(name_width)] + [f"{title:>11}" for _, title, _ in _COLUMNS]
    lines = [
        f"workload {comparison.workload.name}: {len(comparison.workload.tasks)} tasks; "
        f"ideal pod-s {comparison.ideal_pod_seconds:.0f}, ideal wait p95 "
        f"{comparison.ideal_wait_p95:.1f} s",
        " ".join(headers),
    ]
    for name, result in comparison.results.items():
        figures = result.metrics.summary()
        cells = [name.ljust(name_width)] + [
            f"{fmt.format(figures[key]):>11}" for key, _, fmt in _COLUMNS
        ]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def plot(comparisons: list[Comparison], path: Path) -> None:
    """Backlog (ready messages) and workers over time, one row per workload, one line per
    policy. matplotlib is imported here only: the scaler itself never needs it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(comparisons), 2, figsize=(12, 3 * len(comparisons)), squeeze=False
    )
    for row, comparison in zip(axes, comparisons, strict=True):
        backlog_axis, workers_axis = row
        for name, result in comparison.results.items():
            times = [at / 60 for at, _, _ in result.timeline]
            backlog_axis.step(times, [ready for _, ready, _ in result.timeline], label=name, lw=0.8)
            workers_axis.step(times, [pods for _, _, pods in result.timeline], label=name, lw=0.8)
        backlog_axis.set_title(f"{comparison.workload.name}: ready messages")
        workers_axis.set_title(f"{comparison.workload.name}: worker pods")
        for axis in row:
            axis.set_xlabel("minutes")
    axes[0][1].legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=70)
    plt.close(figure)
