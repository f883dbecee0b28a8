"""Benchmarks of the scaler process on the real test bed; they print their figures.

- reaction: publish one message to a queue with no idle worker, time until the Job object
  exists (seen by an admin watch), 20 runs at a 1 s poll interval. Goal: p95 <= 1.5 s.
- scale: 50 pipelines and 1,000 active Jobs (kwok keeps their pods running): cycle time
  (goal <= 250 ms), Kubernetes API requests per cycle (goal: no per-pipeline list calls),
  scaler RSS (goal <= 80 MiB)."""

from __future__ import annotations

import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from jobtide_scaler.config import build_config
from jobtide_scaler.jobs import build_job, cache_selector
from jobtide_testbed.process import wait_for
from kubernetes import client as k8s
from kubernetes import watch
from scaler_bed import RELEASE, ScalerBed, pipeline

pytestmark = pytest.mark.bench


class JobArrivals:
    """Monotonic arrival time of each Job's ADDED event, from an admin watch."""

    def __init__(self, bed: ScalerBed) -> None:
        self.batch = k8s.BatchV1Api(bed.kube.api_client())
        self.namespace = bed.namespace
        self.arrived: dict[str, float] = {}
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for event in self._watch.stream(
            self.batch.list_namespaced_job, self.namespace, label_selector=cache_selector(RELEASE)
        ):
            if event["type"] == "ADDED":
                self.arrived.setdefault(event["object"].metadata.name, time.monotonic())

    def stop(self) -> None:
        self._watch.stop()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def test_reaction_time_from_publish_to_job(bed: ScalerBed) -> None:
    queue = f"{bed.namespace}-react"
    bed.declare(queue)
    scaler = bed.start(
        bed.config({"react": pipeline(queue, maxWorkers=100)}, pollIntervalSeconds=1)
    )
    arrivals = JobArrivals(bed)
    scaler.wait_cycles("react", 2)
    samples = []
    try:
        for run in range(20):
            # A random phase against the poll, as a producer would have.
            time.sleep(random.uniform(0.0, 1.0))
            before = set(arrivals.arrived)
            bed.publish(queue, 1)  # returns once the broker confirmed the message
            published = time.monotonic()
            wait_for(
                lambda before=before: len(arrivals.arrived) > len(before),  # type: ignore[misc]
                timeout=30,
                what=f"the Job of run {run}",
                interval=0.01,
            )
            (new,) = set(arrivals.arrived) - before
            samples.append(arrivals.arrived[new] - published)
    finally:
        arrivals.stop()
    assert len(bed.jobs("react")) == 20
    p50, p95 = percentile(samples, 0.5), percentile(samples, 0.95)
    print(
        f"\nreaction publish->Job over {len(samples)} runs at a 1 s poll: "
        f"p50 {p50:.3f} s, p95 {p95:.3f} s, max {max(samples):.3f} s, "
        f"mean {statistics.mean(samples):.3f} s (goal p95 <= 1.5 s: "
        f"{'met' if p95 <= 1.5 else 'MISSED'})"
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def apiserver_job_requests(bed: ScalerBed) -> dict[str, float]:
    """The apiserver's own count of requests on jobs, by verb (all clients)."""
    text = bed.kube.kubectl("get", "--raw", "/metrics").stdout
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="jobs"' in line:
            verb = line.split('verb="')[1].split('"')[0]
            counts[verb] = counts.get(verb, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_scale_50_pipelines_1000_active_jobs(bed: ScalerBed) -> None:
    pipelines = {
        f"p{i:02d}": pipeline(f"{bed.namespace}-q{i:02d}", maxWorkers=20) for i in range(50)
    }
    config_path = bed.config(pipelines, maxTotalWorkers=2000, pollIntervalSeconds=1)
    document = yaml.safe_load(config_path.read_text())
    settings = build_config(
        document,
        {
            "JOBTIDE_BROKER_HOST": "x",
            "JOBTIDE_BROKER_USERNAME": "x",
            "JOBTIDE_BROKER_PASSWORD": "x",
        },
    )
    batch = k8s.BatchV1Api(bed.kube.api_client())
    started = time.monotonic()
    for p in settings.pipelines:
        for n in range(20):
            batch.create_namespaced_job(bed.namespace, build_job(p, RELEASE, f"bench-{n}"))
    for i in range(50):
        bed.publish(f"{bed.namespace}-q{i:02d}", 20)

    def running() -> int:
        jobs: list[Any] = bed.jobs()
        return sum(1 for j in jobs if (j.status.ready or 0) > 0)

    wait_for(lambda: running() == 1000, timeout=900, what="1,000 running Jobs", interval=5)
    print(f"\n1,000 Jobs created and running in {time.monotonic() - started:.0f} s")

    scaler = bed.start(config_path)
    scaler.wait_cycles("p00", 3)
    assert scaler.metric("jobtide_jobs_active", pipeline="p00") == 20

    def totals() -> tuple[float, float, float, dict[str, float]]:
        m = scaler.metrics()
        requests_total = sum(
            v for (n, _), v in m.items() if n == "jobtide_kubernetes_requests_total"
        )
        return (
            m[("jobtide_cycle_duration_seconds_sum", ())],
            m[("jobtide_cycle_duration_seconds_count", ())],
            requests_total,
            apiserver_job_requests(bed),
        )

    sum0, count0, requests0, server0 = totals()
    rss = []
    for _ in range(20):
        scaler.wait_cycles("p00", 1)
        assert scaler.process.pid is not None
        rss.append(rss_mib(scaler.process.pid))
    sum1, count1, requests1, server1 = totals()
    cycles = count1 - count0
    cycle_ms = (sum1 - sum0) / cycles * 1000
    per_cycle = (requests1 - requests0) / cycles
    server_lists = server1.get("LIST", 0) - server0.get("LIST", 0)
    assert len(bed.jobs()) == 1000  # the backlog is covered: nothing created
    ready = requests.get(f"http://127.0.0.1:{scaler.metrics_port}/readyz", timeout=5)
    assert ready.status_code == 200
    print(
        f"scale, 50 pipelines and 1,000 active Jobs, over {cycles:.0f} cycles: "
        f"mean cycle {cycle_ms:.1f} ms (goal <= 250 ms), scaler Kubernetes requests per "
        f"cycle {per_cycle:.2f}, apiserver LIST calls on jobs meanwhile (all clients) "
        f"{server_lists:.0f}, scaler RSS max {max(rss):.1f} MiB (goal <= 80 MiB)"
    )
