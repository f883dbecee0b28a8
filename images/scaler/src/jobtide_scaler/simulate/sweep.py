"""The cheapest KEDA ScaledJob configuration that waits no longer than a given p95.

KEDA is given its best chance: any strategy (default, accurate, eager), either count mode
(AMQP: ready; HTTP: ready + unacked), jobtide's polling interval or KEDA's default 30 s,
drain-until-idle workers (jobtide's own, the cheaper worker model), a target value (messages
per Job) from 1 to 10 and a worker idle timeout from 5 to 120 s. Its pods keep KEDA's
defaults otherwise: the default scheduler spreads them, the broker round-robins, and nothing
blocks their eviction unless `levers` gives them the do-not-evict annotations (the same
guarantee as jobtide's: no busy worker disrupted).

A full grid is 12 x 10 x 9 = 1,080 runs per workload and node pool, too many for a benchmark on
two shared cores. The search is in two stages, every run remembered:
1. a coarse grid for every strategy, count mode and polling interval: targets 1 and 4, idle
   timeouts 5 and 20 s (48 runs);
2. from the best point of the two cheapest combinations that meet the wait limit (or, when
   none does, that wait least), a local search over the full target and idle-timeout ranges:
   move to the cheapest neighbour that meets the limit (target +-1, the next idle timeout of
   the list) until none is cheaper.
Node-seconds and p95 wait change smoothly and in opposite directions with the target and the
idle timeout, so the local search finds the cheapest configuration on the limit's edge in a
few dozen runs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from jobtide_scaler.simulate.engine import Metrics, Settings, simulate
from jobtide_scaler.simulate.nodes import Levers, NodePool
from jobtide_scaler.simulate.scalers import (
    KEDA_DEFAULT_POLLING_SECONDS,
    KEDA_STRATEGIES,
    NO_LEVERS,
    KedaScaler,
)
from jobtide_scaler.simulate.workloads import Workload

__all__ = [
    "IDLE_TIMEOUTS",
    "TARGETS",
    "KedaConfig",
    "KedaSweep",
    "Sweep",
    "best_keda",
    "bill",
    "cheapest_within",
    "grid_neighbours",
]

TARGETS = tuple(range(1, 11))
IDLE_TIMEOUTS = (5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)
_COARSE_TARGETS = (1, 4)
_COARSE_IDLE_TIMEOUTS = (5.0, 20.0)
_REFINED_COMBINATIONS = 2

C = TypeVar("C", bound=Hashable)  # a configuration under search (ordered: ties go to the least)


@dataclass(frozen=True, order=True)
class KedaConfig:
    strategy: str
    counts_unacked: bool
    polling_seconds: float
    target: int
    idle_timeout_seconds: float

    def settings(self, base: Settings) -> Settings:
        return replace(
            base,
            keda_counts_unacked=self.counts_unacked,
            poll_interval_seconds=self.polling_seconds,
            messages_per_worker=self.target,
            idle_timeout_seconds=self.idle_timeout_seconds,
        )

    def describe(self) -> str:
        return (
            f"{self.strategy}, {'HTTP' if self.counts_unacked else 'AMQP'}, poll "
            f"{self.polling_seconds:.0f} s, target {self.target}, idle "
            f"{self.idle_timeout_seconds:.0f} s"
        )

    def neighbours(self) -> list[KedaConfig]:
        return [
            replace(self, target=target, idle_timeout_seconds=idle)
            for target, idle in grid_neighbours(self.target, self.idle_timeout_seconds)
        ]


def grid_neighbours(target: int, idle_timeout_seconds: float) -> list[tuple[int, float]]:
    """The points next to (target, idle timeout) on the search grid: target +-1 within
    TARGETS, the idle timeout before and after it in IDLE_TIMEOUTS."""
    found = [
        (other, idle_timeout_seconds) for other in (target - 1, target + 1) if other in TARGETS
    ]
    index = IDLE_TIMEOUTS.index(idle_timeout_seconds)
    for other in (index - 1, index + 1):
        if 0 <= other < len(IDLE_TIMEOUTS):
            found.append((target, IDLE_TIMEOUTS[other]))
    return found


@dataclass(frozen=True)
class Sweep(Generic[C]):
    # The cheapest configuration with a p95 wait at or under the limit (None: none found).
    best: tuple[C, Metrics] | None
    # The configuration with the lowest p95 wait seen, for when none meets the limit.
    fastest: tuple[C, Metrics]
    runs: int


KedaSweep = Sweep[KedaConfig]


def cheapest_within(
    grids: Sequence[Sequence[C]],
    run: Callable[[C], Metrics],
    neighbours: Callable[[C], Sequence[C]],
    wait_limit: float,
    cost: Callable[[Metrics], float],
    refined: int,
) -> Sweep[C]:
    """The cheapest configuration whose p95 wait is at most `wait_limit`: the best point of
    each coarse grid (the cheapest within the limit, else the one waiting least), then a local
    search from the `refined` best of those over `neighbours`, every run remembered. Ties go
    to the smaller configuration, so the same arguments give the same answer."""
    seen: dict[C, Metrics] = {}

    def measured(config: C) -> Metrics:
        if config not in seen:
            seen[config] = run(config)
        return seen[config]

    def meets(config: C) -> bool:
        return measured(config).wait_p95 <= wait_limit

    def rank(config: C) -> tuple[bool, float, C]:
        return (not meets(config), cost(measured(config)), config)

    starts: list[C] = []
    for grid in grids:
        feasible = [config for config in grid if meets(config)]
        if feasible:
            starts.append(min(feasible, key=lambda c: (cost(measured(c)), c)))
        else:
            starts.append(min(grid, key=lambda c: (measured(c).wait_p95, cost(measured(c)), c)))

    for start in sorted(starts, key=rank)[:refined]:
        current = start
        while True:
            if meets(current):
                better = [c for c in neighbours(current) if meets(c)]
                better = [c for c in better if cost(measured(c)) < cost(measured(current))]
                if not better:
                    break
                current = min(better, key=lambda c: (cost(measured(c)), c))
            else:
                # Not yet within the limit: step towards lower waits.
                faster = [
                    c
                    for c in neighbours(current)
                    if measured(c).wait_p95 < measured(current).wait_p95
                ]
                if not faster:
                    break
                current = min(faster, key=lambda c: (not meets(c), measured(c).wait_p95, c))
    feasible = [config for config in seen if meets(config)]
    best = min(feasible, key=lambda c: (cost(measured(c)), c)) if feasible else None
    fastest = min(seen, key=lambda c: (measured(c).wait_p95, cost(measured(c)), c))
    return Sweep(
        best=None if best is None else (best, seen[best]),
        fastest=(fastest, seen[fastest]),
        runs=len(seen),
    )


def bill(pool: NodePool | None) -> Callable[[Metrics], float]:
    """What a run costs: node-seconds on a node pool, else pod-seconds."""
    return (lambda m: m.pod_seconds) if pool is None else (lambda m: m.node_seconds)


def best_keda(
    workload: Workload,
    settings: Settings,
    pool: NodePool | None,
    seed: int,
    wait_limit: float,
    levers: Levers = NO_LEVERS,
) -> KedaSweep:
    """The cheapest KEDA configuration (node-seconds with a pool, else pod-seconds) whose p95
    wait is at most `wait_limit`."""

    def run(config: KedaConfig) -> Metrics:
        scaler = KedaScaler(config.settings(settings), config.strategy, drain=True, levers=levers)
        return simulate(workload, config.settings(settings), scaler, seed, pool).metrics

    grids = [
        [
            KedaConfig(strategy, unacked, polling, target, idle)
            for target in _COARSE_TARGETS
            for idle in _COARSE_IDLE_TIMEOUTS
        ]
        for strategy in KEDA_STRATEGIES
        for unacked in (False, True)
        for polling in (settings.poll_interval_seconds, KEDA_DEFAULT_POLLING_SECONDS)
    ]
    return cheapest_within(
        grids, run, KedaConfig.neighbours, wait_limit, bill(pool), _REFINED_COMBINATIONS
    )
