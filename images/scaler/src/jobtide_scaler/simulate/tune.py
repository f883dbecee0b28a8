"""Tuning a pipeline on a workload: the cheapest `messagesPerWorker` and `idleTimeoutSeconds`
whose p95 wait is no longer than the current settings' (or a limit the user names).

The bill is node-seconds on a node pool, else pod-seconds; every other setting, the node
pool and the levers stay as given (`simulate --values` reads them from the chart's values).
The search is the KEDA sweep's (`sweep.cheapest_within`) over the same grid: a coarse grid,
then a local search from its two best points, every run remembered. Like the goal tables,
it answers for one seed: the figures are a replay of one trace, not a forecast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from jobtide_worker.pipeline_settings import PipelineSettings, setting_specs

from jobtide_scaler.simulate.engine import Metrics, Settings, simulate
from jobtide_scaler.simulate.nodes import Levers, NodePool
from jobtide_scaler.simulate.scalers import JobtideScaler
from jobtide_scaler.simulate.sweep import bill, cheapest_within, grid_neighbours
from jobtide_scaler.simulate.workloads import Workload

__all__ = ["TUNED_SETTINGS", "Tuning", "TuningConfig", "tune"]

# The settings tuned, as the simulator's field names.
TUNED_SETTINGS = ("messages_per_worker", "idle_timeout_seconds")
_COARSE_TARGETS = (1, 2, 4)
_COARSE_IDLE_TIMEOUTS = (5.0, 15.0, 30.0)
_REFINED = 2


@dataclass(frozen=True, order=True)
class TuningConfig:
    messages_per_worker: int
    idle_timeout_seconds: float

    @classmethod
    def of(cls, settings: Settings) -> TuningConfig:
        return cls(settings.messages_per_worker, settings.idle_timeout_seconds)

    def settings(self, base: Settings) -> Settings:
        return replace(
            base,
            messages_per_worker=self.messages_per_worker,
            idle_timeout_seconds=self.idle_timeout_seconds,
        )

    def neighbours(self) -> list[TuningConfig]:
        return [
            TuningConfig(target, idle)
            for target, idle in grid_neighbours(self.messages_per_worker, self.idle_timeout_seconds)
        ]

    def values(self) -> dict[str, Any]:
        """The chart values keys of a pipeline that set this configuration."""
        specs = setting_specs(PipelineSettings)
        found: dict[str, Any] = {}
        for name in TUNED_SETTINGS:
            value = getattr(self, name)
            # Whole seconds as whole numbers, as a values file writes them.
            found[specs[name].key] = int(value) if float(value).is_integer() else value
        return found


@dataclass(frozen=True)
class Tuning:
    current: tuple[TuningConfig, Metrics]
    wait_limit: float
    # The cheapest configuration within the limit, the current one included (None: none is).
    best: tuple[TuningConfig, Metrics] | None
    runs: int


def tune(
    workload: Workload,
    settings: Settings,
    pool: NodePool | None,
    levers: Levers,
    seed: int,
    wait_limit: float | None = None,
) -> Tuning:
    """The cheapest tuning of `settings` on `workload` whose p95 wait is at most `wait_limit`
    (default: the current settings' p95 wait)."""

    runs: dict[TuningConfig, Metrics] = {}

    def run(config: TuningConfig) -> Metrics:
        if config not in runs:
            tuned = config.settings(settings)
            scaler = JobtideScaler(tuned, levers=levers)
            runs[config] = simulate(workload, tuned, scaler, seed, pool).metrics
        return runs[config]

    now = TuningConfig.of(settings)
    current = (now, run(now))
    limit = current[1].wait_p95 if wait_limit is None else wait_limit
    grids = [
        [TuningConfig(target, idle) for idle in _COARSE_IDLE_TIMEOUTS] for target in _COARSE_TARGETS
    ]
    cost = bill(pool)
    sweep = cheapest_within(grids, run, TuningConfig.neighbours, limit, cost, _REFINED)
    within = [found for found in (sweep.best, current) if found and found[1].wait_p95 <= limit]
    best = min(within, key=lambda found: (cost(found[1]), found[0])) if within else None
    return Tuning(current=current, wait_limit=limit, best=best, runs=len(runs))
