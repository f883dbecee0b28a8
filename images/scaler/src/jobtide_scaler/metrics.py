"""Prometheus metrics and the health endpoints, served on one port: /metrics, /healthz
(the loop is turning) and /readyz (the Job cache is synced)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def per_pipeline(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, ["pipeline"], registry=r)

        self.queue_ready = per_pipeline(
            "jobtide_queue_messages_ready", "Messages waiting in the pipeline's queue."
        )
        self.queue_unacked = per_pipeline(
            "jobtide_queue_messages_unacked",
            "Messages delivered to workers and not yet acknowledged.",
        )
        self.queue_consumers = per_pipeline(
            "jobtide_queue_consumers", "Consumers of the pipeline's queue."
        )
        self.queue_oldest_age = per_pipeline(
            "jobtide_queue_oldest_message_age_seconds",
            "How long the oldest message waiting in the pipeline's queue has been there, at "
            "least (estimated from the broker's publish counter; 0 when none waits; absent "
            "when the broker keeps no message statistics).",
        )
        self.broker_data_age = per_pipeline(
            "jobtide_broker_data_age_seconds", "Age of the pipeline's broker counts."
        )
        self.jobs_active = per_pipeline(
            "jobtide_jobs_active", "Worker Jobs not finished, pending ones included."
        )
        self.jobs_pending = per_pipeline(
            "jobtide_jobs_pending", "Worker Jobs with no running pod yet."
        )
        self.dead_letter_messages = per_pipeline(
            "jobtide_dead_letter_messages",
            "Messages in the pipeline's dead-letter queue (<queue>.dlq).",
        )
        self.max_workers = per_pipeline(
            "jobtide_pipeline_max_workers", "The pipeline's cap on worker Jobs (maxWorkers)."
        )
        self.max_total_workers = Gauge(
            "jobtide_max_total_workers",
            "The release's cap on worker Jobs over all pipelines (scaler.maxTotalWorkers).",
            registry=r,
        )
        self.jobs_failed = Counter(
            "jobtide_jobs_failed",
            "Worker Jobs seen failing since this scaler started.",
            ["pipeline"],
            registry=r,
        )
        self.jobs_created = Counter(
            "jobtide_jobs_created", "Worker Jobs created.", ["pipeline"], registry=r
        )
        self.decisions = Counter(
            "jobtide_decisions",
            "Per-pipeline decisions of each cycle, by result: create, none, dry_run, "
            "stale (broker data missing or old), in_doubt (an earlier create's outcome is "
            "unknown), not_leader, cache_unsynced, owner_unknown (the Deployment that owns the "
            "worker Jobs could not be read yet), throttled (the apiserver asked to wait with "
            "Retry-After).",
            ["pipeline", "result"],
            registry=r,
        )
        self.errors = Counter("jobtide_errors", "Errors by kind.", ["kind"], registry=r)
        self.kubernetes_requests = Counter(
            "jobtide_kubernetes_requests",
            "Requests to the Kubernetes API by verb.",
            ["verb"],
            registry=r,
        )
        self.cycle_duration = Histogram(
            "jobtide_cycle_duration_seconds",
            "Duration of one scaling cycle.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.is_leader = Gauge(
            "jobtide_leader", "1 while this replica holds the Lease.", registry=r
        )
        self.failed_jobs_deleted = Counter(
            "jobtide_failed_jobs_deleted",
            "Failed worker Jobs deleted beyond failedJobsHistoryLimit.",
            ["pipeline"],
            registry=r,
        )

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def request(self, verb: str) -> None:
        self.kubernetes_requests.labels(verb=verb).inc()


class Health:
    """What the probes report. `alive` fails when no cycle ended for `stall_seconds`."""

    def __init__(self, stall_seconds: float, ready: Callable[[], bool]) -> None:
        self.stall_seconds = stall_seconds
        self._ready = ready
        self._last_cycle = time.monotonic()

    def cycle_done(self) -> None:
        self._last_cycle = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self._last_cycle < self.stall_seconds

    def ready(self) -> bool:
        return self._ready()


class MetricsServer:
    def __init__(self, port: int, metrics: Metrics, health: Health, host: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from other pods
        registry, probe = metrics.registry, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    ok = probe.alive()
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
                elif self.path == "/readyz":
                    ok = probe.ready()
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(
                self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # a scrape every few seconds is not news

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
