"""Benchmark: the node bill. jobtide's defaults against the cheapest KEDA ScaledJob
configuration that waits no longer (jobtide_scaler.simulate.sweep) and against the HPA, on
every workload and node autoscaler (Karpenter with each consolidation policy, the cluster
autoscaler), beside an omniscient node-level reference and a true lower bound; prints the goal
table of issue 12 and checks its goals (docs/simulator.md records the figures).

KEDA is swept twice: as it runs by default (nothing stops a node autoscaler from evicting its
busy workers, and its Jobs retry an evicted pod) and with jobtide's do-not-evict annotations
(no lost work, as jobtide). The saving goals apply to Karpenter; they are judged under its
default consolidation policy, WhenEmptyOrUnderutilized, the one users get, and reported under
WhenEmpty too. A goal counts as met, or as out of reach when what it asks for lies below the
lower bound (`ideal.node_seconds_lower_bound` at jobtide's p95 wait: no policy whose workers
are never evicted goes below it at that wait or less). The goals known to be missed are listed
in KNOWN_MISSES: they are printed with the bound, not asserted; every other goal is asserted."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from itertools import pairwise

import pytest
from jobtide_scaler.simulate.breakdown import simulate_with_breakdown
from jobtide_scaler.simulate.engine import Metrics, Scaler, Settings, simulate
from jobtide_scaler.simulate.ideal import (
    ideal_node_seconds,
    ideal_wait_p95,
    node_seconds_lower_bound,
)
from jobtide_scaler.simulate.nodes import Autoscaler, Consolidation, Levers, NodePool
from jobtide_scaler.simulate.scalers import (
    JOBTIDE_LEVERS,
    NO_LEVERS,
    HpaScaler,
    JobtideScaler,
    KedaScaler,
)
from jobtide_scaler.simulate.sweep import KedaSweep, best_keda
from jobtide_scaler.simulate.workloads import WORKLOADS, Workload, make_workload
from jobtide_worker import priority
from simlib import show

pytestmark = pytest.mark.bench

SEED = 1
POOLS = {
    "karpenter": NodePool(autoscaler=Autoscaler.KARPENTER),
    "karpenter-when-empty": NodePool(
        autoscaler=Autoscaler.KARPENTER, consolidation=Consolidation.WHEN_EMPTY
    ),
    "ca": NodePool(autoscaler=Autoscaler.CLUSTER_AUTOSCALER),
}
# Goals (issue 12): node-seconds below the best KEDA configuration at equal or lower p95,
# under Karpenter (judged under its default consolidation policy, the pool named "karpenter").
KARPENTER_SAVINGS = {"declining": 0.25, "diurnal": 0.15}
SAVINGS_JUDGED_ON = "karpenter"
MOST_AGAINST_KEDA = 1.02
LEAST_SAVING_AGAINST_HPA = 0.40
# KEDA's pods with jobtide's do-not-evict annotations: the same no-lost-work guarantee.
GUARDED = Levers(karpenter_do_not_disrupt=True, ca_safe_to_evict=False)
KEDA_KINDS = {"evictable": NO_LEVERS, "guarded": GUARDED}
# A workload has idle gaps when it has 10 minutes without an arrival.
IDLE_GAP_SECONDS = 600.0
# The goals jobtide's defaults miss, and no bound shows out of reach (docs/simulator.md,
# "Against the goals of issue 12"): printed with the bound, not asserted. Each with its reason.
KNOWN_MISSES = frozenset(
    {
        # The saving goals. No lever measured reaches declining's (18 % below the guarded
        # KEDA: what is left over the work is per node launched, and the free slots of a pool
        # that shrinks without moving busy workers) nor diurnal's against the evictable KEDA
        # (its gap is node churn: 38 launches against 10, and KEDA's repacking of busy work).
        "declining/karpenter saving evictable",
        "declining/karpenter saving guarded",
        "diurnal/karpenter saving evictable",
        # At most 1.02 x the evictable KEDA: Karpenter's consolidation repacks KEDA's evictable
        # workers at the price of busy workers' work (13 lost), which jobtide's do-not-disrupt
        # forbids.
        "diurnal/karpenter at-most evictable",
        # 40 % below the HPA: on diurnal the HPA's replicas, fed round robin all day, cost
        # 30 % more than jobtide, not 67 %; elsewhere the HPA waits less (its one replica
        # keeps a node warm), so it is compared at a wait jobtide with minWorkers 0 does not
        # reach.
        "diurnal/karpenter hpa",
        "diurnal/karpenter-when-empty hpa",
        "diurnal/ca hpa",
        "cold-pool/ca hpa",
    }
)


# The levers of charts 0.3.x: the worker's consumer priority by its own age, not its node's.
# The measurements made with them ("Protect busy workers only", "Leave when the queue is
# silent") compare against the defaults of their time, so their figures stay as recorded.
LEVERS_0_3 = replace(JOBTIDE_LEVERS, consumer_priority=priority.AGE)
DEFAULTS_0_3 = "defaults of 0.3 (age priority)"
# What the node priority may bill more than the age priority on a row (measured: 0.3 % on
# diurnal under the cluster autoscaler, seed 1).
ALLOWANCE_OVER_AGE = 1.005

# Protecting busy workers only (docs/simulator.md, "Protect busy workers only"): the worker
# patches its pod's do-not-evict annotations as it goes busy and idle, each patch landing 2 s
# later; on SIGTERM it finishes a started task within its shutdown grace (25 s, the worker's
# default) and an idle one exits at once. Measured with the default idle timeout and a longer
# one (idle workers being evictable, a longer idle timeout might now cost little), beside the
# longer one with the annotations for life, which tells the lever's share from the timeout's.
BUSY_ONLY = replace(
    LEVERS_0_3,
    protect_busy_only=True,
    protection_delay_seconds=2.0,
    eviction_grace_seconds=25.0,
)
PROTECTION_CANDIDATES = {
    "busy-only, idle 15 s": (Settings(), BUSY_ONLY),
    "busy-only, idle 30 s": (Settings(idle_timeout_seconds=30.0), BUSY_ONLY),
    "for life, idle 30 s": (Settings(idle_timeout_seconds=30.0), LEVERS_0_3),
}


# Leaving when the queue is silent (docs/simulator.md, "Leave when the queue is silent"), the
# defaults since chart 0.3.0: an idle worker reads the queue's publish counter every 5 s (the
# broker's statistics interval: a shorter read finds the same counter) and leaves when nothing
# was published since its last read and nothing is ready; a queue still fed keeps it up to its
# idle timeout, 15 s. Beside them: the defaults before (idle 5 s, no reads) and a longer idle
# timeout.
BEFORE_SILENT_QUEUE = "before 0.3.0: idle 5 s, no reads"
# What an abrupt end of the load may cost the defaults more than before (measured: 0.24 % on
# bursty under Karpenter, seed 1).
ABRUPT_END_ALLOWANCE = 1.005
# The rows where the defaults wait longer than before (docs/simulator.md, "Leave when the queue
# is silent"): steady under Karpenter, p95 25.4 s against 24.5 s at 0.2 % more node-seconds
# (its p95 moves by seconds with the phase of the reads: 19.5 s with the first read 0.25 s
# into the idle spell, 24.1 s with 1 s, a single seed's noise more than the lever's effect);
# trickle under Karpenter, 117.7 s against 117.4 s at 0.3 % fewer node-seconds.
SLOWER_THAN_BEFORE = frozenset(
    {
        "steady/karpenter",
        "steady/karpenter-when-empty",
        "trickle/karpenter",
        "trickle/karpenter-when-empty",
    }
)
SILENT_QUEUE_CANDIDATES = {
    BEFORE_SILENT_QUEUE: Settings(idle_timeout_seconds=5.0, quiet_check_seconds=0.0),
    "silent queue, idle 20 s": Settings(idle_timeout_seconds=20.0),
}


def has_idle_gaps(workload: Workload) -> bool:
    arrivals = [task.arrival for task in workload.tasks] + [workload.horizon_seconds]
    return any(later - earlier >= IDLE_GAP_SECONDS for earlier, later in pairwise(arrivals))


@dataclass(frozen=True)
class Row:
    workload: Workload
    pool: str
    jobtide: Metrics
    # The cheapest KEDA at jobtide's p95 or less: as KEDA runs by default (its busy workers
    # may be evicted), and with the same do-not-evict annotations as jobtide.
    keda: dict[str, KedaSweep]
    hpa: Metrics
    reference: float  # omniscient node-seconds at jobtide's p95 wait (not a bound)
    # No policy whose workers are never evicted goes below, at jobtide's p95 wait or less (a
    # true bound).
    bound: float

    @property
    def name(self) -> str:
        return f"{self.workload.name}/{self.pool}"

    @property
    def hpa_saving(self) -> float:
        return 1 - self.jobtide.node_seconds / self.hpa.node_seconds

    def keda_cell(self, kind: str) -> str:
        sweep = self.keda[kind]
        if sweep.best is None:
            config, theirs = sweep.fastest
            return f"none as fast ({theirs.node_seconds:.0f} at {theirs.wait_p95:.1f})"
        config, theirs = sweep.best
        ratio = self.jobtide.node_seconds / theirs.node_seconds
        return (
            f"{theirs.node_seconds:.0f} at {theirs.wait_p95:.1f} = x{ratio:.2f} "
            f"[{config.describe()}; {theirs.busy_pods_disrupted} disrupted]"
        )

    def lines(self) -> list[str]:
        ours = self.jobtide
        return [
            f"{self.name}: jobtide {ours.node_seconds:.0f} node-s at p95 {ours.wait_p95:.1f} s, "
            f"{ours.busy_pods_disrupted} disrupted | reference {self.reference:.0f} "
            f"(x{ours.node_seconds / self.reference:.2f}) | bound {self.bound:.0f} | hpa "
            f"{self.hpa.node_seconds:.0f} at {self.hpa.wait_p95:.1f} ({self.hpa_saving:.0%} less)",
            *(f"    best KEDA, {kind}: {self.keda_cell(kind)}" for kind in KEDA_KINDS),
        ]


def measure(
    workload: Workload, pool_name: str, settings: Settings, levers: Levers = JOBTIDE_LEVERS
) -> Row:
    pool = POOLS[pool_name]
    ours = simulate(workload, settings, JobtideScaler(settings, levers=levers), SEED, pool).metrics
    budget = max(ours.wait_p95, ideal_wait_p95(workload, settings, pool=pool))
    return Row(
        workload=workload,
        pool=pool_name,
        jobtide=ours,
        keda={
            kind: best_keda(workload, settings, pool, SEED, ours.wait_p95, levers)
            for kind, levers in KEDA_KINDS.items()
        },
        hpa=simulate(workload, settings, HpaScaler(settings), SEED, pool).metrics,
        reference=ideal_node_seconds(workload, settings, pool, budget),
        bound=node_seconds_lower_bound(workload, settings, pool, ours.wait_p95),
    )


@dataclass(frozen=True)
class Verdict:
    key: str  # "<workload>/<pool> <goal>[ <KEDA kind>]", as in KNOWN_MISSES
    ok: bool  # met, or out of reach by the lower bound
    words: str


def verdicts(row: Row) -> list[Verdict]:
    """The goals that apply to this row, each met, out of reach, or missed."""
    found: list[Verdict] = []
    ours = row.jobtide.node_seconds

    def judged(key: str, asked: float, words: str) -> Verdict:
        if ours <= asked:
            return Verdict(key, True, words + "met")
        if asked < row.bound:
            return Verdict(
                key, True, words + f"out of reach: asks <= {asked:.0f}, bound {row.bound:.0f}"
            )
        return Verdict(
            key,
            False,
            words + f"MISSED: asks <= {asked:.0f}; bound {row.bound:.0f}, reference "
            f"{row.reference:.0f} (not a bound)",
        )

    for kind in KEDA_KINDS:
        best = row.keda[kind].best
        if best is None:
            words = f"{row.name}: no {kind} KEDA waits as little: met"
            found.append(Verdict(f"{row.name} at-most {kind}", True, words))
            continue
        theirs = best[1].node_seconds
        saving = KARPENTER_SAVINGS.get(row.workload.name)
        if saving is not None and row.pool == SAVINGS_JUDGED_ON:
            words = f"{row.name}: >= {saving:.0%} below the best {kind} KEDA: "
            words += f"{1 - ours / theirs:.1%} "
            found.append(judged(f"{row.name} saving {kind}", theirs * (1 - saving), words))
        words = f"{row.name}: <= {MOST_AGAINST_KEDA} x the best {kind} KEDA: x{ours / theirs:.3f} "
        found.append(judged(f"{row.name} at-most {kind}", theirs * MOST_AGAINST_KEDA, words))
    if has_idle_gaps(row.workload):
        note = ""
        if row.jobtide.wait_p95 > row.hpa.wait_p95:
            note = f" (the HPA waits less, p95 {row.hpa.wait_p95:.1f} s: its replica keeps a node)"
        words = f"{row.name}: >= 40% below the HPA: {row.hpa_saving:.0%}{note} "
        asked = row.hpa.node_seconds * (1 - LEAST_SAVING_AGAINST_HPA)
        found.append(judged(f"{row.name} hpa", asked, words))
    disrupted = row.jobtide.busy_pods_disrupted
    words = f"{row.name}: busy workers disrupted: {disrupted}"
    found.append(Verdict(f"{row.name} disrupted", disrupted == 0, words))
    return found


@dataclass(frozen=True)
class Bench:
    rows: list[Row]
    seconds: float


@pytest.fixture(scope="module")
def bench() -> Bench:
    started = time.perf_counter()
    rows = [
        measure(make_workload(name, SEED), pool, Settings()) for name in WORKLOADS for pool in POOLS
    ]
    return Bench(rows, time.perf_counter() - started)


def measure_all(settings: Settings, levers: Levers) -> list[Row]:
    return [
        measure(make_workload(name, SEED), pool, settings, levers)
        for name in WORKLOADS
        for pool in POOLS
    ]


@pytest.fixture(scope="module")
def rows_0_3() -> list[Row]:
    """The defaults of charts 0.3.x on every row: today's settings, the age priority."""
    return measure_all(Settings(), LEVERS_0_3)


def test_the_node_bill(bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    """The goal table. Every goal not in KNOWN_MISSES is met (or out of reach by the bound);
    the known misses are printed with the bound. No busy worker is disrupted, and no row goes
    below the lower bound (else it would not be one)."""
    rows = bench.rows
    results = [verdict for row in rows for verdict in verdicts(row)]
    report = [line for row in rows for line in row.lines()]
    report += ["", "goals:"]
    for verdict in results:
        mark = "ok  " if verdict.ok else "miss" if verdict.key in KNOWN_MISSES else "FAIL"
        report.append(f"  {mark} {verdict.words}")
    runs = sum(sweep.runs for row in rows for sweep in row.keda.values())
    report.append(
        f"{len(rows)} workload x node pool pairs, {runs} KEDA runs in the sweeps, "
        f"{bench.seconds:.0f} s"
    )
    show(capsys, report)
    for row in rows:
        assert row.jobtide.tasks_unfinished == 0
        assert row.jobtide.node_seconds >= row.bound, row.name
    assert [v.words for v in results if not v.ok and v.key not in KNOWN_MISSES] == []


# The rows whose saving goals are missed: where jobtide's node-seconds go there, beside the
# best KEDA's (docs/simulator.md, "Where the node-seconds go").
BREAKDOWN_ROWS = ("declining/karpenter", "diurnal/karpenter")


def test_where_the_node_seconds_go(bench: Bench, capsys: pytest.CaptureFixture[str]) -> None:
    """jobtide's and each best KEDA's node-seconds split by what the nodes held
    (`simulate.breakdown`); the parts add up to the bill."""
    report = []
    for row in bench.rows:
        if row.name not in BREAKDOWN_ROWS:
            continue
        settings = Settings()
        runs: dict[str, tuple[Settings, Scaler]] = {"jobtide": (settings, JobtideScaler(settings))}
        for kind, levers in KEDA_KINDS.items():
            best = row.keda[kind].best
            if best is not None:
                config = best[0]
                theirs = config.settings(settings)
                runs[f"best KEDA, {kind} [{config.describe()}]"] = (
                    theirs,
                    KedaScaler(theirs, config.strategy, drain=True, levers=levers),
                )
        report.append(f"{row.name} (bound {row.bound:.0f}):")
        for label, (run_settings, scaler) in runs.items():
            result, parts = simulate_with_breakdown(
                row.workload, run_settings, scaler, SEED, POOLS[row.pool]
            )
            ours = result.metrics
            report.append(
                f"  {label}: {ours.node_seconds:.0f} node-s at p95 {ours.wait_p95:.1f} s, "
                f"{ours.nodes_launched} nodes launched, {ours.busy_pods_disrupted} disrupted"
            )
            report.append(f"    {parts.describe()}")
            assert parts.total == pytest.approx(ours.node_seconds), label
    show(capsys, report)


def compared_cell(row: Row) -> str:
    """One configuration's figures on a row: node-seconds (p95 wait, busy workers disrupted)
    and its ratio to each best KEDA at its p95 or less."""
    ours = row.jobtide
    ratios = []
    for kind in KEDA_KINDS:
        best = row.keda[kind].best
        ratios.append("-" if best is None else f"x{ours.node_seconds / best[1].node_seconds:.2f}")
    return (
        f"{ours.node_seconds:.0f} ({ours.wait_p95:.1f} s, {ours.busy_pods_disrupted}) "
        + " / ".join(ratios)
    )


def goals_met(rows: list[Row]) -> int:
    return sum(verdict.ok for row in rows for verdict in verdicts(row))


def compared_tables(configs: dict[str, list[Row]]) -> list[str]:
    """Each configuration's rows side by side (the first is the base), then how many goals
    each configuration meets."""
    first = next(iter(configs.values()))
    report = [
        "node-s (p95 wait, busy disrupted) x best evictable KEDA / x best guarded KEDA",
        "row | " + " | ".join(configs),
    ]
    for index, row in enumerate(first):
        cells = [compared_cell(rows[index]) for rows in configs.values()]
        report.append(f"{row.name} | " + " | ".join(cells))
    report.append("")
    for label, rows in configs.items():
        results = [verdict for row in rows for verdict in verdicts(row)]
        missed = [verdict.key for verdict in results if not verdict.ok]
        disrupted = sum(row.jobtide.busy_pods_disrupted for row in rows)
        report.append(
            f"{label}: {len(results) - len(missed)} of {len(results)} goals met or out of "
            f"reach, {disrupted} busy workers disrupted; missed: {', '.join(missed) or 'none'}"
        )
    return report


def racing_evictions(settings: Settings, levers: Levers) -> dict[str, int]:
    """Per row that can evict a pod with workers (WhenEmpty cannot), the busy workers evicted
    before their annotation landed: with no grace each one is cut off and counted."""
    no_grace = replace(levers, eviction_grace_seconds=0.0)
    return {
        f"{name}/{pool}": simulate(
            make_workload(name, SEED),
            settings,
            JobtideScaler(settings, levers=no_grace),
            SEED,
            POOLS[pool],
        ).metrics.busy_pods_disrupted
        for name in WORKLOADS
        for pool in POOLS
        if POOLS[pool].consolidation is not Consolidation.WHEN_EMPTY
        or POOLS[pool].autoscaler is not Autoscaler.KARPENTER
    }


@pytest.fixture(scope="module")
def candidate_rows() -> dict[str, list[Row]]:
    return {
        label: measure_all(settings, levers)
        for label, (settings, levers) in PROTECTION_CANDIDATES.items()
    }


def test_protect_busy_workers_only(
    rows_0_3: list[Row], candidate_rows: dict[str, list[Row]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The goal table of protecting busy workers only (and of the longer idle timeout with
    the annotations for life), beside the defaults: each row's node-seconds (p95 wait, busy
    workers disrupted) and its ratio to the best evictable / guarded KEDA at that p95 or
    less; then how many goals each configuration meets. Every task is done; busy workers cut
    off in the race (evicted before their annotation landed and not done within the grace)
    are counted, not hidden."""
    report = compared_tables({DEFAULTS_0_3: rows_0_3, **candidate_rows})
    report += [
        "",
        "busy workers evicted before their annotation landed (grace 0, every one cut off):",
    ]
    for label, (settings, levers) in PROTECTION_CANDIDATES.items():
        if levers.protect_busy_only:
            raced = racing_evictions(settings, levers)
            listed = ", ".join(f"{name} {count}" for name, count in raced.items() if count)
            report.append(f"  {label}: {sum(raced.values())} ({listed or 'none'})")
    show(capsys, report)
    for rows in candidate_rows.values():
        assert [row.name for row in rows] == [row.name for row in rows_0_3]
        for row in rows:
            assert row.jobtide.tasks_unfinished == 0, row.name


def test_leave_when_the_queue_is_silent(
    rows_0_3: list[Row], capsys: pytest.CaptureFixture[str]
) -> None:
    """The goal table of the defaults of 0.3 (idle workers leave once the queue is silent,
    idle timeout 15 s) beside the defaults before them and a longer idle timeout, all with
    the levers of their time. The defaults cost at most half a percent more than before on
    any row (where the load stops abruptly), less over all rows, wait no longer except on
    SLOWER_THAN_BEFORE, and meet more goals (seed 1)."""
    candidates = {
        label: measure_all(settings, LEVERS_0_3)
        for label, settings in SILENT_QUEUE_CANDIDATES.items()
    }
    show(capsys, compared_tables({DEFAULTS_0_3: rows_0_3, **candidates}))
    for rows in candidates.values():
        assert [row.name for row in rows] == [row.name for row in rows_0_3]
        for ours in rows:
            assert ours.jobtide.tasks_unfinished == 0, ours.name
            assert ours.jobtide.busy_pods_disrupted == 0, ours.name
    before = candidates[BEFORE_SILENT_QUEUE]
    slower = []
    for ours, old in zip(rows_0_3, before, strict=True):
        # Where a load stops abruptly every worker leaves at its second read, 5.5 s into its
        # idle spell (the first read waits half a second, so that no read falls between two
        # messages taken back to back), half a second after the 5 s idle timeout did.
        assert ours.jobtide.node_seconds <= old.jobtide.node_seconds * ABRUPT_END_ALLOWANCE, (
            ours.name
        )
        if ours.jobtide.wait_p95 > old.jobtide.wait_p95:
            slower.append(ours.name)
    assert set(slower) == SLOWER_THAN_BEFORE
    assert sum(row.jobtide.node_seconds for row in rows_0_3) < sum(
        row.jobtide.node_seconds for row in before
    )
    assert goals_met(rows_0_3) > goals_met(before)


def test_older_nodes_first(
    bench: Bench, rows_0_3: list[Row], capsys: pytest.CaptureFixture[str]
) -> None:
    """The goal table of the defaults (the node priority: the workers of older nodes first,
    round robin on a node) beside the defaults of 0.3 (the age priority) and no priority at
    all. The node priority bills fewer node-seconds over all rows and meets more goals; no
    row bills more than ALLOWANCE_OVER_AGE x the age priority's (seed 1)."""
    no_priority = measure_all(Settings(), replace(JOBTIDE_LEVERS, consumer_priority=priority.NONE))
    configs = {"defaults (node priority)": bench.rows, DEFAULTS_0_3: rows_0_3}
    show(capsys, compared_tables({**configs, "no priority": no_priority}))
    for ours, old in zip(bench.rows, rows_0_3, strict=True):
        assert ours.name == old.name
        assert ours.jobtide.tasks_unfinished == old.jobtide.tasks_unfinished == 0
        assert ours.jobtide.node_seconds <= old.jobtide.node_seconds * ALLOWANCE_OVER_AGE, ours.name
    assert sum(row.jobtide.node_seconds for row in bench.rows) < sum(
        row.jobtide.node_seconds for row in rows_0_3
    )
    assert goals_met(bench.rows) > goals_met(rows_0_3)
