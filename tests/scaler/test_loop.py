"""The scaling cycle with fakes around it: the only way to inject create calls whose outcome
is unknown, stale broker data and lost leadership on demand. The real adapters are tested
against the test bed in test_scaler_integration.py."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from helpers import BROKER_ENV, config_document, pipeline_document
from jobtide_scaler.broker import QueueReading
from jobtide_scaler.cluster import CacheSnapshot, CreateOutcome, CreateResult
from jobtide_scaler.config import ScalerConfig, build_config
from jobtide_scaler.events import Event
from jobtide_scaler.jobs import ANNOTATION_CREATE_ID, LABEL_PIPELINE
from jobtide_scaler.jobstate import JobRecord, JobState, count_jobs
from jobtide_scaler.loop import CreateLedger, Scaler
from jobtide_scaler.metrics import Metrics
from jobtide_scaler.status import StatusDocument

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeBroker:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.counts: dict[str, tuple[int, int]] = {}
        self.read_at: float | None = None
        # Queues whose publish counter the broker keeps, with their oldest_waiting_since.
        self.oldest: dict[str, float | None] = {}

    def read(
        self, queues: Iterable[str], counted_only: Iterable[str] = ()
    ) -> dict[str, QueueReading]:
        at = self.clock() if self.read_at is None else self.read_at
        wanted = {*queues, *counted_only}
        return {
            q: QueueReading(
                r,
                u,
                0,
                at,
                published=0 if q in self.oldest else None,
                oldest_waiting_since=self.oldest.get(q),
            )
            for q, (r, u) in self.counts.items()
            if q in wanted
        }


class FakeJobs:
    """The apiserver as the scaler sees it. `outcomes` scripts the next create calls; a Job
    "lands" (exists in the apiserver) for CREATED and for UNKNOWN outcomes listed in
    `landing_unknowns`; `visible` controls whether the cache has caught up."""

    def __init__(self) -> None:
        self.records: list[JobRecord] = []
        self.pending_visibility: list[JobRecord] = []
        self.outcomes: list[CreateOutcome] = []
        self.unknown_lands = False
        self.synced = True
        self.created_manifests: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.seen: set[str] = set()
        # The Deployments the apiserver would return; reading another one fails as a 404.
        self.deployments: dict[str, dict[str, Any]] = {}
        self.deployment_reads = 0
        self.events: list[tuple[dict[str, Any], Event]] = []
        # A refused create's Retry-After (the apiserver's 429 under API Priority and Fairness).
        self.retry_after: float | None = None
        # The status documents written, by ConfigMap; a failure to inject, if any.
        self.status: list[tuple[str, str]] = []
        self.status_error: Exception | None = None

    def snapshot(self) -> CacheSnapshot:
        failed: dict[str, list[JobRecord]] = {}
        for r in self.records:
            if r.state is JobState.FAILED:
                failed.setdefault(r.pipeline, []).append(r)
        return CacheSnapshot(self.synced, count_jobs(self.records), frozenset(self.seen), failed)

    def catch_up(self) -> None:
        """The watch delivers what landed."""
        for r in self.pending_visibility:
            self.records.append(r)
            self.seen.add(r.create_id)
        self.pending_visibility.clear()

    def create_job(self, manifest: dict[str, Any]) -> CreateResult:
        outcome = self.outcomes.pop(0) if self.outcomes else CreateOutcome.CREATED
        name = f"job-{len(self.created_manifests)}"
        landed = outcome is CreateOutcome.CREATED or (
            outcome is CreateOutcome.UNKNOWN and self.unknown_lands
        )
        if landed:
            self.created_manifests.append(manifest)
            meta = manifest["metadata"]
            self.pending_visibility.append(
                JobRecord(
                    name,
                    f"uid-{name}",
                    meta["labels"][LABEL_PIPELINE],
                    meta["annotations"][ANNOTATION_CREATE_ID],
                    JobState.PENDING,
                    "",
                )
            )
        if outcome is CreateOutcome.CREATED:
            return CreateResult(outcome, name=name)
        return CreateResult(outcome, reason="injected", retry_after=self.retry_after)

    def post_event(self, owner: Mapping[str, Any], event: Event) -> None:
        self.events.append((dict(owner), event))

    def write_status(self, config_map: str, text: str) -> None:
        if self.status_error is not None:
            raise self.status_error
        self.status.append((config_map, text))

    def read_deployment(self, name: str) -> dict[str, Any]:
        self.deployment_reads += 1
        if name not in self.deployments:
            raise LookupError(f"deployments.apps {name!r} not found")
        return self.deployments[name]

    def delete_failed_job(self, record: JobRecord) -> None:
        self.deleted.append(record.name)
        self.records.remove(record)

    def jobs_of(self, pipeline: str) -> int:
        return sum(
            m["metadata"]["labels"][LABEL_PIPELINE] == pipeline for m in self.created_manifests
        )


class Leader:
    def __init__(self) -> None:
        self.leading = True
        self.lose_after_checks: int | None = None

    def is_leader(self) -> bool:
        if self.lose_after_checks is not None:
            if self.lose_after_checks == 0:
                self.leading = False
            self.lose_after_checks -= 1
        return self.leading


# When the scaler under test started: 2026-01-01T00:00:00Z.
STARTED_AT = 1767225600.0


class World:
    def __init__(self, config: ScalerConfig) -> None:
        self.clock = Clock()
        self.broker = FakeBroker(self.clock)
        self.jobs = FakeJobs()
        self.leader = Leader()
        self.metrics = Metrics()
        self.ledger = CreateLedger(doubt_seconds=60)
        self.scaler = Scaler(
            config,
            self.broker,
            self.jobs,
            self.metrics,
            leadership=self.leader,
            ledger=self.ledger,
            clock=self.clock,
            wall_clock=lambda: STARTED_AT,
        )

    def cycle(self, advance: float = 1.0) -> dict[str, str]:
        self.clock.now += advance
        return {d.pipeline: d.result for d in self.scaler.run_cycle()}

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def world(**overrides: Any) -> World:
    return World(build_config(config_document(**overrides), BROKER_ENV))


def test_backlog_creates_jobs_and_unobserved_creations_count_until_the_cache_sees_them() -> None:
    w = world()
    w.broker.counts["resize-q"] = (3, 0)
    assert w.cycle() == {"resize": "create"}
    assert w.jobs.jobs_of("resize") == 3
    # The watch has not delivered the Jobs yet: the ledger still counts them.
    assert w.cycle() == {"resize": "none"}
    w.jobs.catch_up()
    assert w.cycle() == {"resize": "none"}
    assert w.ledger.uncounted("resize") == 0
    assert w.jobs.jobs_of("resize") == 3
    assert w.metric("jobtide_jobs_created_total", pipeline="resize") == 3


@pytest.mark.parametrize("lands", [True, False], ids=["ambiguous-create-landed", "did-not-land"])
def test_unknown_create_outcome_never_duplicates(lands: bool) -> None:
    w = world()
    w.broker.counts["resize-q"] = (1, 0)
    w.jobs.outcomes = [CreateOutcome.UNKNOWN]
    w.jobs.unknown_lands = lands
    assert w.cycle() == {"resize": "create"}
    assert w.metric("jobtide_errors_total", kind="kubernetes_create_unknown") == 1
    # However long the cache takes, the pipeline creates nothing while in doubt.
    for _ in range(10):
        assert w.cycle() == {"resize": "in_doubt"}
    w.jobs.catch_up()
    if lands:
        # The cache shows the Job with the create id: it counts, and no second one is made.
        assert w.cycle() == {"resize": "none"}
        assert w.cycle(advance=120) == {"resize": "none"}
        assert w.jobs.jobs_of("resize") == 1
    else:
        assert w.cycle() == {"resize": "in_doubt"}
        # The doubt window passed with the cache synced and the Job never showed: retry.
        assert w.cycle(advance=60) == {"resize": "create"}
        assert w.jobs.jobs_of("resize") == 1


def test_doubt_does_not_expire_while_the_cache_is_unsynced() -> None:
    w = world()
    w.broker.counts["resize-q"] = (1, 0)
    w.jobs.outcomes = [CreateOutcome.UNKNOWN]
    w.jobs.unknown_lands = True
    w.cycle()
    w.jobs.synced = False
    assert w.cycle(advance=300) == {"resize": "cache_unsynced"}
    w.jobs.catch_up()
    w.jobs.synced = True
    assert w.cycle() == {"resize": "none"}
    assert w.jobs.jobs_of("resize") == 1


def test_refused_create_stops_the_pipeline_for_this_cycle_only() -> None:
    w = world()
    w.broker.counts["resize-q"] = (3, 0)
    w.jobs.outcomes = [CreateOutcome.CREATED, CreateOutcome.REJECTED]
    w.cycle()
    assert w.jobs.jobs_of("resize") == 1
    assert w.metric("jobtide_errors_total", kind="kubernetes_create") == 1
    assert not w.ledger.is_in_doubt("resize")
    w.jobs.catch_up()
    assert w.cycle() == {"resize": "create"}
    assert w.jobs.jobs_of("resize") == 3


def test_stale_or_missing_broker_data_creates_nothing() -> None:
    w = world(pipelines={"a": pipeline_document("qa"), "b": pipeline_document("qb")})
    w.broker.counts["qa"] = (5, 0)
    w.broker.read_at = w.clock.now - 100  # older than brokerStaleAfterSeconds (30)
    assert w.cycle() == {"a": "stale", "b": "stale"}  # b's queue is missing altogether
    assert w.jobs.created_manifests == []
    w.broker.read_at = None
    assert w.cycle() == {"a": "create", "b": "stale"}


def test_unsynced_cache_creates_nothing() -> None:
    w = world()
    w.broker.counts["resize-q"] = (5, 0)
    w.jobs.synced = False
    assert w.cycle() == {"resize": "cache_unsynced"}
    assert w.jobs.created_manifests == []


def test_dry_run_decides_logs_and_creates_nothing(caplog: pytest.LogCaptureFixture) -> None:
    config = build_config(config_document(), BROKER_ENV, dry_run=True)
    w = World(config)
    w.broker.counts["resize-q"] = (4, 0)
    with caplog.at_level(logging.INFO, logger="jobtide_scaler.loop"):
        assert w.cycle() == {"resize": "dry_run"}
    assert w.jobs.created_manifests == []
    assert "would create 4 Job(s) for pipeline resize" in caplog.text


def test_only_the_leader_creates_and_losing_the_lease_stops_mid_cycle() -> None:
    w = world()
    w.broker.counts["resize-q"] = (5, 0)
    w.leader.leading = False
    assert w.cycle() == {"resize": "not_leader"}
    assert w.jobs.created_manifests == []
    w.leader.leading = True
    w.leader.lose_after_checks = 3  # the cycle's check, then two creates
    w.cycle()
    assert w.jobs.jobs_of("resize") == 2


def test_caps_per_pipeline_and_global_reach_the_creates() -> None:
    w = world(
        maxTotalWorkers=5,
        pipelines={
            "a": pipeline_document("qa", maxWorkers=4, maxNewPerCycle=10),
            "b": pipeline_document("qb", maxWorkers=10, maxNewPerCycle=2),
        },
    )
    w.broker.counts.update(qa=(50, 0), qb=(50, 0))
    w.cycle()
    # Room for 5: the fair split gives a 3 and b 2 (its per-cycle limit).
    assert (w.jobs.jobs_of("a"), w.jobs.jobs_of("b")) == (3, 2)
    w.jobs.catch_up()
    w.cycle()
    w.jobs.catch_up()
    w.cycle()
    assert (w.jobs.jobs_of("a"), w.jobs.jobs_of("b")) == (3, 2)


def test_failed_jobs_beyond_the_history_limit_are_deleted_oldest_first() -> None:
    w = world(pipelines={"resize": pipeline_document("resize-q", failedJobsHistoryLimit=2)})
    for i, at in enumerate(
        [
            "2026-01-01T00:00:03Z",
            "2026-01-01T00:00:01Z",
            "2026-01-01T00:00:04Z",
            "2026-01-01T00:00:02Z",
        ]
    ):
        w.jobs.records.append(JobRecord(f"f{i}", f"u{i}", "resize", "", JobState.FAILED, at))
    w.jobs.records.append(JobRecord("run", "u-run", "resize", "", JobState.RUNNING, ""))
    w.broker.counts["resize-q"] = (0, 0)
    w.cycle()
    assert w.jobs.deleted == ["f1", "f3"]
    w.cycle()
    assert w.jobs.deleted == ["f1", "f3"]
    assert w.metric("jobtide_failed_jobs_deleted_total", pipeline="resize") == 2


def test_metrics_names() -> None:
    w = world()
    w.broker.counts["resize-q"] = (2, 1)
    w.broker.oldest["resize-q"] = None
    w.cycle()
    names = {m.name for m in w.metrics.registry.collect()}
    assert {
        "jobtide_queue_messages_ready",
        "jobtide_queue_messages_unacked",
        "jobtide_queue_consumers",
        "jobtide_broker_data_age_seconds",
        "jobtide_queue_oldest_message_age_seconds",
        "jobtide_jobs_active",
        "jobtide_jobs_pending",
        "jobtide_jobs_created",
        "jobtide_decisions",
        "jobtide_errors",
        "jobtide_kubernetes_requests",
        "jobtide_cycle_duration_seconds",
        "jobtide_leader",
        "jobtide_failed_jobs_deleted",
        "jobtide_dead_letter_messages",
        "jobtide_pipeline_max_workers",
        "jobtide_max_total_workers",
        "jobtide_jobs_failed",
    } <= names
    assert w.metric("jobtide_queue_messages_ready", pipeline="resize") == 2
    assert w.metric("jobtide_queue_messages_unacked", pipeline="resize") == 1
    assert w.metric("jobtide_decisions_total", pipeline="resize", result="create") == 1
    assert w.metric("jobtide_cycle_duration_seconds_count") == 1


def test_no_job_is_created_before_its_owner_is_known() -> None:
    w = world(ownerDeployment="jobs-jobtide-scaler")
    w.broker.counts["resize-q"] = (2, 0)
    # The owner cannot be read (not there yet, or the API refuses): nothing is created.
    assert w.cycle() == {"resize": "owner_unknown"}
    assert w.scaler.owner_known is False
    assert w.jobs.created_manifests == []
    assert w.metric("jobtide_errors_total", kind="kubernetes_owner") == 1
    w.jobs.deployments["jobs-jobtide-scaler"] = {
        "metadata": {"name": "jobs-jobtide-scaler", "uid": "uid-deploy", "labels": {"x": "y"}}
    }
    assert w.cycle() == {"resize": "create"}
    assert w.scaler.owner_known is True
    owners = [m["metadata"]["ownerReferences"] for m in w.jobs.created_manifests]
    assert owners == [
        [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "jobs-jobtide-scaler",
          "uid": "uid-deploy"}]
    ] * 2  # fmt: skip
    # Read once: later cycles reuse it.
    w.jobs.catch_up()
    w.cycle()
    assert w.jobs.deployment_reads == 2


def test_without_an_owner_configured_jobs_have_none() -> None:
    w = world()
    w.broker.counts["resize-q"] = (1, 0)
    assert w.cycle() == {"resize": "create"}
    assert "ownerReferences" not in w.jobs.created_manifests[0]["metadata"]
    assert w.jobs.deployment_reads == 0


def test_the_oldest_waiting_message_age_is_absent_when_unknown_and_0_when_none_waits() -> None:
    w = world()
    name = "jobtide_queue_oldest_message_age_seconds"
    w.broker.counts["resize-q"] = (4, 0)
    w.cycle()
    assert w.metrics.registry.get_sample_value(name, {"pipeline": "resize"}) is None
    w.broker.oldest["resize-q"] = w.clock.now - 30.0
    w.cycle(advance=2.0)
    assert w.metric(name, pipeline="resize") == 32.0
    # The live count says the queue emptied since the management API's reading.
    w.broker.counts["resize-q"] = (0, 4)
    w.cycle()
    assert w.metric(name, pipeline="resize") == 0.0
    # Statistics turned off on the broker: the figure goes rather than stays.
    del w.broker.oldest["resize-q"]
    w.cycle()
    assert w.metrics.registry.get_sample_value(name, {"pipeline": "resize"}) is None


def test_failed_jobs_are_counted_once_and_only_when_they_failed_after_the_start() -> None:
    w = world()
    w.broker.counts["resize-q"] = (0, 0)
    failed = [
        JobRecord("old", "u-old", "resize", "", JobState.FAILED, "2025-12-31T23:59:59Z"),
        JobRecord("new", "u-new", "resize", "", JobState.FAILED, "2026-01-01T00:00:05Z"),
    ]
    w.jobs.records.extend(failed)
    w.cycle()
    w.cycle()
    assert w.metric("jobtide_jobs_failed_total", pipeline="resize") == 1
    w.jobs.records.append(
        JobRecord("newer", "u-newer", "resize", "", JobState.FAILED, "2026-01-01T00:01:00Z")
    )
    w.cycle()
    assert w.metric("jobtide_jobs_failed_total", pipeline="resize") == 2


def test_caps_and_the_dead_letter_queue_are_exported() -> None:
    w = world()
    w.broker.counts["resize-q"] = (0, 0)
    w.broker.counts["resize-q.dlq"] = (4, 1)
    w.cycle()
    assert w.metric("jobtide_dead_letter_messages", pipeline="resize") == 5
    assert w.metric("jobtide_pipeline_max_workers", pipeline="resize") == (
        w.scaler.config.pipelines[0].settings.max_workers
    )
    assert w.metric("jobtide_max_total_workers") == w.scaler.config.settings.max_total_workers


def test_the_leader_reports_events_on_the_owner_and_a_follower_does_not() -> None:
    w = world(ownerDeployment="jobs-jobtide-scaler")
    w.jobs.deployments["jobs-jobtide-scaler"] = {
        "metadata": {"name": "jobs-jobtide-scaler", "uid": "uid-deploy"}
    }
    max_workers = w.scaler.config.pipelines[0].settings.max_workers
    w.broker.counts["resize-q"] = (10 * max_workers, 0)
    w.leader.leading = False
    w.cycle()
    assert w.jobs.events == []
    w.leader.leading = True
    # Up to the cap at maxNewPerCycle a cycle: creations are reported at once (then summed
    # up a minute later), reaching the cap once.
    while w.jobs.jobs_of("resize") < max_workers:
        w.cycle()
        w.jobs.catch_up()
    w.cycle(advance=60)
    owners = {owner["uid"] for owner, _ in w.jobs.events}
    assert owners == {"uid-deploy"}
    assert [event.reason for _, event in w.jobs.events] == ["JobsCreated", "AtCap", "JobsCreated"]
    assert f"created {max_workers - w.scaler.config.pipelines[0].settings.max_new_per_cycle}" in (
        w.jobs.events[-1][1].message
    )
    w.broker.read_at = w.clock.now - 100  # the broker's counts go stale
    w.cycle()
    assert w.jobs.events[-1][1].reason == "BrokerCountsStale"


def test_a_lost_event_never_stops_the_scaling() -> None:
    w = world(ownerDeployment="jobs-jobtide-scaler")
    w.jobs.deployments["jobs-jobtide-scaler"] = {"metadata": {"name": "d", "uid": "u"}}

    def refuse(owner: Mapping[str, Any], event: Event) -> None:
        raise RuntimeError("events are forbidden")

    w.jobs.post_event = refuse  # type: ignore[method-assign]
    w.broker.counts["resize-q"] = (1, 0)
    assert w.cycle() == {"resize": "create"}
    assert w.metric("jobtide_errors_total", kind="kubernetes_event") == 1


def test_a_429_with_retry_after_stops_creating_until_it_has_passed() -> None:
    w = world()
    w.broker.counts["resize-q"] = (5, 0)
    w.jobs.outcomes = [CreateOutcome.CREATED, CreateOutcome.REJECTED]
    w.jobs.retry_after = 30.0
    assert w.cycle() == {"resize": "create"}
    assert w.jobs.jobs_of("resize") == 1  # the second create was refused: the cycle stops
    w.jobs.catch_up()
    w.jobs.retry_after = None
    # 29 s after the refusal: still waiting, whatever the backlog.
    assert w.cycle(advance=10) == {"resize": "throttled"}
    assert w.cycle(advance=19) == {"resize": "throttled"}
    assert w.jobs.jobs_of("resize") == 1
    assert w.cycle(advance=1) == {"resize": "create"}
    assert w.jobs.jobs_of("resize") == 5
    assert w.metric("jobtide_decisions_total", pipeline="resize", result="throttled") == 2


def status_of(w: World) -> StatusDocument:
    return StatusDocument.from_json(w.jobs.status[-1][1])


def test_the_leader_writes_its_figures_on_a_changed_decision_and_at_most_every_refresh() -> None:
    w = world(statusConfigMap="rel-jobtide-scaler-status", maxTotalWorkers=50)
    refresh = w.scaler.status_throttle.refresh_seconds
    w.broker.counts["resize-q"] = (3, 1)
    w.broker.counts["resize-q.dlq"] = (2, 0)
    w.cycle()
    assert [name for name, _ in w.jobs.status] == ["rel-jobtide-scaler-status"]
    doc = status_of(w)
    assert (doc.release, doc.namespace, doc.max_total_workers) == ("rel", "jobs", 50)
    p = doc.pipelines["resize"]
    assert (p.queue, p.ready, p.in_flight, p.dead_lettered) == ("resize-q", 3, 1, 2)
    assert (p.decision, p.created, p.last_created, p.desired) == ("create", 4, 4, 4)
    assert p.reason == "backlog 4 wants 4 worker(s), 0 active: created 4"
    # A changed decision is written at once; the same one again soon after is not.
    w.jobs.catch_up()
    w.broker.counts["resize-q"] = (0, 4)
    w.cycle()
    w.cycle()
    assert len(w.jobs.status) == 2
    p = status_of(w).pipelines["resize"]
    assert (p.decision, p.active, p.pending, p.created, p.last_created) == ("none", 4, 4, 0, 4)
    assert p.last_created_at == status_of(w).written_at
    assert p.reason == "backlog 4 wants 4 worker(s), 4 active"
    # Unchanged decisions are written again once the refresh period has passed.
    w.cycle(advance=refresh)
    assert len(w.jobs.status) == 3


def test_a_follower_writes_no_status_and_a_failed_write_is_counted_and_retried() -> None:
    w = world(statusConfigMap="rel-jobtide-scaler-status")
    w.leader.leading = False
    w.cycle()
    assert w.jobs.status == []
    w.leader.leading = True
    w.jobs.status_error = RuntimeError("configmaps is forbidden")
    w.broker.counts["resize-q"] = (1, 0)
    assert w.cycle() == {"resize": "create"}
    assert w.metric("jobtide_errors_total", kind="kubernetes_status") == 1
    w.jobs.status_error = None
    w.cycle()
    assert len(w.jobs.status) == 1


def test_held_at_a_cap_and_stale_counts_say_why() -> None:
    w = world(statusConfigMap="s", maxTotalWorkers=2)
    w.broker.counts["resize-q"] = (5, 0)
    w.cycle()
    w.jobs.catch_up()
    w.cycle()
    p = status_of(w).pipelines["resize"]
    assert (p.decision, p.cap) == ("none", "maxTotalWorkers")
    assert p.reason == "backlog 5 wants 5 worker(s), 2 active: held at maxTotalWorkers 2"
    w.broker.read_at = w.clock.now - 100
    w.cycle()
    p = status_of(w).pipelines["resize"]
    assert (p.decision, p.broker_fresh) == ("stale", False)
    assert p.reason.startswith("no fresh broker counts")


def test_without_a_status_config_map_nothing_is_written() -> None:
    w = world()
    w.broker.counts["resize-q"] = (1, 0)
    w.cycle()
    assert w.jobs.status == []
