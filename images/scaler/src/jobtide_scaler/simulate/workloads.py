"""Workloads: task arrival times and durations, generated from a seed or read from a trace.

Durations are log-normal (mean 10 s unless a workload says otherwise): most tasks are short,
a few are several times longer, as in real pipelines.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WORKLOADS", "Task", "Workload", "make_workload", "read_trace"]

MEAN_TASK_SECONDS = 10.0
_DURATION_SIGMA = 0.6


@dataclass(frozen=True)
class Task:
    arrival: float
    duration: float


@dataclass(frozen=True)
class Workload:
    name: str
    tasks: tuple[Task, ...]
    # Simulated time at least (the run goes on until every task is done and pods are gone).
    horizon_seconds: float
    # (low, high) latency of bringing up a node when the pool is at zero; None: always warm.
    node_provisioning_seconds: tuple[float, float] | None = None


def _duration(rng: random.Random, mean: float = MEAN_TASK_SECONDS) -> float:
    mu = math.log(mean) - _DURATION_SIGMA**2 / 2
    return rng.lognormvariate(mu, _DURATION_SIGMA)


def _poisson(rng: random.Random, rate: float, start: float, end: float) -> Iterable[float]:
    at = start
    while True:
        at += rng.expovariate(rate)
        if at >= end:
            return
        yield at


def _burst(rng: random.Random, at: float, count: int, spread: float) -> list[float]:
    return [at + rng.uniform(0, spread) for _ in range(count)]


def _tasks(
    rng: random.Random, arrivals: Iterable[float], mean: float = MEAN_TASK_SECONDS
) -> tuple[Task, ...]:
    return tuple(Task(at, _duration(rng, mean)) for at in sorted(arrivals))


def steady(rng: random.Random) -> Workload:
    """Poisson arrivals, 0.4 tasks/s for 2 h: about four busy workers all the time."""
    horizon = 7200.0
    return Workload("steady", _tasks(rng, _poisson(rng, 0.4, 0, horizon)), horizon)


def bursty(rng: random.Random) -> Workload:
    """Spikes of 100-400 tasks within a minute every 10-20 minutes over a thin background."""
    horizon = 7200.0
    arrivals = list(_poisson(rng, 0.01, 0, horizon))
    at = rng.uniform(60, 300)
    while at < horizon - 600:
        arrivals += _burst(rng, at, rng.randint(100, 400), 60)
        at += rng.uniform(600, 1200)
    return Workload("bursty", _tasks(rng, arrivals), horizon)


def diurnal(rng: random.Random) -> Workload:
    """Two compressed days of 4 h: the rate follows a sine up to 1 task/s by day and is zero
    for the half of each day that is night."""
    horizon = 8 * 3600.0
    day = 4 * 3600.0
    peak = 1.0
    arrivals = [
        at
        for at in _poisson(rng, peak, 0, horizon)
        if rng.random() < max(0.0, math.sin(2 * math.pi * at / day))
    ]
    return Workload("diurnal", _tasks(rng, arrivals), horizon)


def giant_burst(rng: random.Random) -> Workload:
    """3,000 tasks within the first minute, then nothing."""
    return Workload("giant-burst", _tasks(rng, _burst(rng, 0, 3000, 60)), 3600.0)


def trickle(rng: random.Random) -> Workload:
    """One task every two minutes on average for 3 h."""
    horizon = 3 * 3600.0
    return Workload("trickle", _tasks(rng, _poisson(rng, 1 / 120, 0, horizon)), horizon)


def cold_pool(rng: random.Random) -> Workload:
    """Bursts of 50-300 tasks within 30 s, 20-40 minutes apart: the node pool has scaled to
    zero before each, and a node takes 60-120 s to come up."""
    horizon = 4 * 3600.0
    arrivals: list[float] = []
    at = rng.uniform(60, 300)
    while at < horizon - 600:
        arrivals += _burst(rng, at, rng.randint(50, 300), 30)
        at += rng.uniform(1200, 2400)
    return Workload("cold-pool", _tasks(rng, arrivals), horizon, (60.0, 120.0))


def declining(rng: random.Random) -> Workload:
    """A 2-minute ramp to 4 tasks/s, 3 minutes flat, then a 15-minute linear decline to
    nothing; tasks of 4 s on average, so the peak needs about 16 workers, under the cap."""
    ramp, flat, decline, peak = 120.0, 180.0, 900.0, 4.0

    def rate(at: float) -> float:
        if at < ramp:
            return peak * at / ramp
        if at < ramp + flat:
            return peak
        return peak * max(0.0, 1 - (at - ramp - flat) / decline)

    horizon = ramp + flat + decline
    arrivals = [at for at in _poisson(rng, peak, 0, horizon) if rng.random() < rate(at) / peak]
    return Workload("declining", _tasks(rng, arrivals, mean=4.0), horizon)


WORKLOADS: dict[str, Callable[[random.Random], Workload]] = {
    "steady": steady,
    "bursty": bursty,
    "diurnal": diurnal,
    "giant-burst": giant_burst,
    "trickle": trickle,
    "cold-pool": cold_pool,
    "declining": declining,
}


def make_workload(name: str, seed: int) -> Workload:
    """The named workload; the same seed gives the same tasks."""
    try:
        factory = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None
    return factory(random.Random(f"{name}:{seed}"))


def read_trace(
    path: Path,
    seed: int,
    node_provisioning_seconds: tuple[float, float] | None = None,
) -> Workload:
    """A user's trace: CSV rows `arrival_seconds[,duration_seconds]`, an optional header.
    Rows without a duration get a log-normal one (mean 10 s) drawn from the seed."""
    rng = random.Random(f"trace:{seed}")
    tasks: list[Task] = []
    with path.open(newline="") as stream:
        for line_number, row in enumerate(csv.reader(stream), start=1):
            cells = [cell.strip() for cell in row]
            if not cells or not cells[0] or cells[0].startswith("#"):
                continue
            try:
                arrival = float(cells[0])
                duration = float(cells[1]) if len(cells) > 1 and cells[1] else _duration(rng)
            except ValueError:
                if line_number == 1:
                    continue  # a header
                raise ValueError(f"{path}:{line_number}: expected numbers, got {row!r}") from None
            if arrival < 0 or duration < 0:
                # A duration of 0 is a task shorter than the trace's resolution: valid.
                raise ValueError(
                    f"{path}:{line_number}: arrival and duration must be >= 0, got {row!r}"
                )
            tasks.append(Task(arrival, duration))
    if not tasks:
        raise ValueError(f"{path}: no tasks in the trace")
    tasks.sort(key=lambda task: task.arrival)
    return Workload(
        f"trace:{path.name}",
        tuple(tasks),
        tasks[-1].arrival,
        node_provisioning_seconds,
    )
