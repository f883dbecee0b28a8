"""One scaling cycle: read the queue counts and the Job cache, ask the policy, create Jobs.

Duplicates after an unknown outcome: every create call carries a fresh create id (annotation
`jobtide.io/create-id`). When a call ends without a clear answer (read timeout, connection
lost after sending, a 5xx), the Job may exist or not. The pipeline then stays "in doubt" and
creates nothing until either the cache sees a Job with that create id (it landed, and is
counted like any other) or the cache has been synced while `doubt_seconds` passed since the
call (by then the apiserver has answered or given up on it: it did not land). Jobs that were
created for sure but are not in the cache yet count as active Jobs, so a slow watch
event cannot cause a second Job either."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from jobtide_worker import topology

from jobtide_scaler.broker import QueueReading
from jobtide_scaler.cluster import CacheSnapshot, CreateOutcome, CreateResult
from jobtide_scaler.config import PipelineConfig, ScalerConfig
from jobtide_scaler.events import Event, EventPolicy, PipelineFacts
from jobtide_scaler.jobs import build_job, owner_reference
from jobtide_scaler.jobstate import JobCounts, JobRecord
from jobtide_scaler.metrics import Metrics
from jobtide_scaler.policy import Observation, desired_workers, jobs_to_create, limiting_cap
from jobtide_scaler.status import (
    PipelineStatus,
    StatusDocument,
    StatusThrottle,
    explain,
    rfc3339,
    with_last_created,
)

log = logging.getLogger(__name__)

# The apiserver's default request timeout: a create still unanswered after this is gone.
DEFAULT_DOUBT_SECONDS = 60.0


class BrokerReader(Protocol):
    def read(
        self, queues: Iterable[str], counted_only: Iterable[str] = ()
    ) -> dict[str, QueueReading]: ...


class JobStore(Protocol):
    def snapshot(self) -> CacheSnapshot: ...

    def create_job(self, manifest: dict[str, Any]) -> CreateResult: ...

    def delete_failed_job(self, record: JobRecord) -> None: ...

    def read_deployment(self, name: str) -> dict[str, Any]: ...

    def post_event(self, owner: Mapping[str, Any], event: Event) -> None: ...

    def write_status(self, config_map: str, text: str) -> None: ...


class Leadership(Protocol):
    def is_leader(self) -> bool: ...


class AlwaysLeader:
    """Leader election disabled: this replica is the only one."""

    def is_leader(self) -> bool:
        return True


@dataclass
class CreateLedger:
    """Create calls whose Job the cache has not shown yet, per pipeline."""

    doubt_seconds: float = DEFAULT_DOUBT_SECONDS
    unobserved: dict[str, dict[str, float]] = field(default_factory=dict)
    in_doubt: dict[str, dict[str, float]] = field(default_factory=dict)

    def created(self, pipeline: str, create_id: str, at: float) -> None:
        self.unobserved.setdefault(pipeline, {})[create_id] = at

    def unknown(self, pipeline: str, create_id: str, at: float) -> None:
        self.in_doubt.setdefault(pipeline, {})[create_id] = at

    def reconcile(self, snapshot: CacheSnapshot, now: float) -> None:
        for book in (self.unobserved, self.in_doubt):
            for pipeline, ids in list(book.items()):
                for create_id, at in list(ids.items()):
                    expired = snapshot.synced and now - at >= self.doubt_seconds
                    if create_id in snapshot.seen_create_ids or expired:
                        del ids[create_id]
                if not ids:
                    del book[pipeline]

    def uncounted(self, pipeline: str) -> int:
        """Jobs that may exist but are not in the cache yet."""
        return len(self.unobserved.get(pipeline, ())) + len(self.in_doubt.get(pipeline, ()))

    def is_in_doubt(self, pipeline: str) -> bool:
        return bool(self.in_doubt.get(pipeline))


@dataclass(frozen=True)
class Extra:
    """A pipeline's figures of this cycle beyond the policy's Observation, for the status
    view."""

    counted: bool  # the broker's counts of the queue were read
    dead_lettered: int | None
    oldest_age_seconds: float | None
    pending: int


@dataclass(frozen=True)
class PipelineDecision:
    pipeline: str
    result: str  # the `result` label of jobtide_decisions_total


class Scaler:
    def __init__(
        self,
        config: ScalerConfig,
        broker: BrokerReader,
        jobs: JobStore,
        metrics: Metrics,
        *,
        leadership: Leadership | None = None,
        ledger: CreateLedger | None = None,
        clock: Callable[[], float] = time.monotonic,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex[:12],
        wall_clock: Callable[[], float] = time.time,
        identity: str = "",
        status_throttle: StatusThrottle | None = None,
    ) -> None:
        self.config = config
        self.broker = broker
        self.jobs = jobs
        self.metrics = metrics
        self.leadership = leadership or AlwaysLeader()
        self.ledger = ledger or CreateLedger()
        self.clock = clock
        self.new_id = new_id
        self.wall_clock = wall_clock
        # Who writes the status figures: the Lease holder's identity when elections run.
        self.identity = identity
        self.status_throttle = status_throttle or StatusThrottle()
        self._extra: dict[str, Extra] = {}
        self._last_created: dict[str, tuple[int, str]] = {}
        # The caps are configuration: exported once, beside the counts they bound.
        self.metrics.max_total_workers.set(config.settings.max_total_workers)
        for p in config.pipelines:
            self.metrics.max_workers.labels(p.name).set(p.settings.max_workers)
        # RFC 3339 UTC, as the apiserver writes a Job's failure time: they compare as text.
        self._started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_clock()))
        self._failed_seen: set[str] = set()
        self._owner: Mapping[str, Any] | None = None
        self.events = EventPolicy()
        # Per pipeline, this cycle: Jobs created and why a create failed.
        self._created: dict[str, int] = {}
        self._create_failed: dict[str, str] = {}
        # The apiserver answered a create with 429 and Retry-After: no create before this.
        self._create_not_before = 0.0

    @property
    def owner_known(self) -> bool:
        """False while the Deployment that must own the Jobs has not been read: no Job is
        created without its owner, or `helm uninstall` would leave it behind."""
        return self.config.owner_deployment is None or self._owner is not None

    def _read_owner(self) -> None:
        name = self.config.owner_deployment
        if name is None or self._owner is not None:
            return
        try:
            self._owner = owner_reference(self.jobs.read_deployment(name))
        except Exception as e:
            self.metrics.error("kubernetes_owner")
            log.warning(
                "reading Deployment %s, the owner of the worker Jobs: %s; creating no Job "
                "until it can be read",
                name,
                e,
            )
            return
        log.info("worker Jobs are owned by Deployment %s (uid %s)", name, self._owner["uid"])

    def run_cycle(self) -> list[PipelineDecision]:
        started = self.clock()
        try:
            return self._cycle()
        finally:
            self.metrics.cycle_duration.observe(self.clock() - started)

    def _observe(self, snapshot: CacheSnapshot) -> dict[str, Observation]:
        pipelines = self.config.pipelines
        dead_letter_queues = {p.name: topology.dead_letter_queue(p.queue) for p in pipelines}
        readings = self.broker.read((p.queue for p in pipelines), dead_letter_queues.values())
        now = self.clock()
        self.ledger.reconcile(snapshot, now)
        observations = {}
        for p in pipelines:
            reading = readings.get(p.queue)
            counts = snapshot.counts.get(p.name, JobCounts())
            uncounted = self.ledger.uncounted(p.name)
            fresh = reading is not None and (
                now - reading.read_at <= self.config.settings.broker_stale_after_seconds
            )
            observations[p.name] = Observation(
                ready=reading.ready if reading else 0,
                unacked=reading.unacked if reading else 0,
                active_jobs=counts.active + uncounted,
                broker_fresh=fresh,
            )
            m = self.metrics
            dead = readings.get(dead_letter_queues[p.name])
            oldest = None
            if reading is not None and reading.published is not None:
                oldest = oldest_waiting_age(reading, now)
            self._extra[p.name] = Extra(
                counted=reading is not None,
                dead_lettered=dead.ready + dead.unacked if dead is not None else None,
                oldest_age_seconds=oldest,
                pending=counts.pending,
            )
            if dead is not None:
                m.dead_letter_messages.labels(p.name).set(dead.ready + dead.unacked)
            m.jobs_active.labels(p.name).set(counts.active)
            m.jobs_pending.labels(p.name).set(counts.pending)
            if reading is not None:
                m.queue_ready.labels(p.name).set(reading.ready)
                m.queue_unacked.labels(p.name).set(reading.unacked)
                m.queue_consumers.labels(p.name).set(reading.consumers)
                m.broker_data_age.labels(p.name).set(now - reading.read_at)
                if oldest is not None:
                    m.queue_oldest_age.labels(p.name).set(oldest)
                else:
                    # Unknown is absent, never a 0 that would read as "nothing waits".
                    with contextlib.suppress(KeyError):
                        m.queue_oldest_age.remove(p.name)
        return observations

    def _cycle(self) -> list[PipelineDecision]:
        self._read_owner()
        snapshot = self.jobs.snapshot()
        self._count_failures(snapshot)
        observations = self._observe(snapshot)
        wanted = jobs_to_create(
            {p.name: (p.settings, observations[p.name]) for p in self.config.pipelines},
            self.config.settings.max_total_workers,
        )
        leading = self.leadership.is_leader()
        decisions = []
        self._created, self._create_failed = {}, {}
        for p in self.config.pipelines:
            observation = observations[p.name]
            count = wanted.get(p.name, 0)
            result = self._act(p, observation, count, snapshot.synced, leading)
            self.metrics.decisions.labels(p.name, result).inc()
            decisions.append(PipelineDecision(p.name, result))
        if leading and snapshot.synced and not self.config.dry_run:
            self._trim_failed(snapshot)
            self._report(observations, wanted)
        if leading and not self.config.dry_run:
            self._publish_status(observations, wanted, decisions)
        return decisions

    def status_document(
        self,
        observations: Mapping[str, Observation],
        wanted: Mapping[str, int],
        decisions: Sequence[PipelineDecision],
    ) -> StatusDocument:
        """This cycle's figures and decisions, as the status view shows them."""
        results = {d.pipeline: d.result for d in decisions}
        total = self.config.settings.max_total_workers
        pipelines = {}
        for p in self.config.pipelines:
            o, extra = observations[p.name], self._extra[p.name]
            created = self._created.get(p.name, 0)
            decision = results[p.name]
            cap = limiting_cap(p.settings, o, wanted.get(p.name, 0))
            pipelines[p.name] = PipelineStatus(
                queue=p.queue,
                ready=o.ready if extra.counted else None,
                in_flight=o.unacked if extra.counted else None,
                dead_lettered=extra.dead_lettered,
                oldest_age_seconds=extra.oldest_age_seconds,
                broker_fresh=o.broker_fresh,
                active=o.active_jobs,
                pending=extra.pending,
                max_workers=p.settings.max_workers,
                desired=desired_workers(p.settings, o),
                decision=decision,
                reason=explain(decision, p.settings, o, created, cap, total),
                cap=cap,
                created=created,
            )
        election = self.config.leader_election
        document = StatusDocument(
            release=self.config.release,
            namespace=self.config.namespace,
            writer=self.identity,
            lease_name=election.lease_name if election.enabled else None,
            written_at=rfc3339(self.wall_clock()),
            refresh_seconds=self.status_throttle.refresh_seconds,
            poll_interval_seconds=self.config.settings.poll_interval_seconds,
            max_total_workers=total,
            pipelines=pipelines,
        )
        return with_last_created(document, self._last_created)

    def _publish_status(
        self,
        observations: Mapping[str, Observation],
        wanted: Mapping[str, int],
        decisions: Sequence[PipelineDecision],
    ) -> None:
        """Write the status document when it is due (the leader only, like Events)."""
        name = self.config.status_config_map
        if name is None:
            return
        document = self.status_document(observations, wanted, decisions)
        for pipeline, status in document.pipelines.items():
            if status.last_created_at is not None:
                self._last_created[pipeline] = (status.last_created, status.last_created_at)
        now = self.clock()
        if not self.status_throttle.due(document, now):
            return
        try:
            self.jobs.write_status(name, document.to_json())
        except Exception as e:
            # The status is for people: failing to write it never stops the scaling; the
            # next cycle tries again, and the view flags the figures as stale meanwhile.
            self.metrics.error("kubernetes_status")
            log.warning("writing the status figures to ConfigMap %s: %s", name, e)
            return
        self.status_throttle.written(document, now)

    def _report(self, observations: Mapping[str, Observation], wanted: Mapping[str, int]) -> None:
        """Post this cycle's Events on the owner (the leader only: one voice per release)."""
        if self._owner is None:
            return
        now = self.clock()
        for p in self.config.pipelines:
            o = observations[p.name]
            facts = PipelineFacts(
                pipeline=p.name,
                queue=p.queue,
                broker_fresh=o.broker_fresh,
                cap=limiting_cap(p.settings, o, wanted.get(p.name, 0)),
                active_jobs=o.active_jobs,
                backlog=o.ready + o.unacked,
                created=self._created.get(p.name, 0),
                create_failed=self._create_failed.get(p.name),
            )
            for event in self.events.observe(facts, now):
                try:
                    self.jobs.post_event(self._owner, event)
                except Exception as e:
                    # An Event is a courtesy: losing one never stops the scaling.
                    self.metrics.error("kubernetes_event")
                    log.warning("posting Event %s: %s", event.reason, e)

    def _count_failures(self, snapshot: CacheSnapshot) -> None:
        """Count each failed worker Job once, and only those that failed after this scaler
        started: a restarted scaler does not report old failures as new ones."""
        failed_now = set()
        for pipeline, records in snapshot.failed.items():
            for record in records:
                failed_now.add(record.uid)
                if record.uid not in self._failed_seen and record.failed_at >= self._started_at:
                    self.metrics.jobs_failed.labels(pipeline).inc()
        # Forget the Jobs that are gone, so the set stays as small as the cache.
        self._failed_seen = failed_now

    def _act(
        self,
        p: PipelineConfig,
        observation: Observation,
        count: int,
        synced: bool,
        leading: bool,
    ) -> str:
        if not synced:
            return "cache_unsynced"
        if not self.owner_known:
            return "owner_unknown"
        if not observation.broker_fresh:
            return "stale"
        if self.ledger.is_in_doubt(p.name):
            return "in_doubt"
        if not leading:
            return "not_leader"  # the leader decides; this replica only watches
        if count == 0:
            return "none"
        if self.clock() < self._create_not_before:
            return "throttled"
        if self.config.dry_run:
            log.info(
                "dry run: would create %d Job(s) for pipeline %s (%s)",
                count,
                p.name,
                _describe(observation),
            )
            return "dry_run"
        created = self._create(p, count)
        log.info(
            "created %d of %d Job(s) for pipeline %s (%s)",
            created,
            count,
            p.name,
            _describe(observation),
        )
        return "create"

    def _create(self, p: PipelineConfig, count: int) -> int:
        cycle_id = self.new_id()
        created = 0
        for index in range(count):
            if not self.leadership.is_leader():
                break  # lost the Lease mid-cycle: the new leader decides from here
            create_id = f"{cycle_id}-{index}"
            result = self.jobs.create_job(build_job(p, self.config.release, create_id, self._owner))
            if result.outcome is CreateOutcome.CREATED:
                self.ledger.created(p.name, create_id, self.clock())
                self.metrics.jobs_created.labels(p.name).inc()
                created += 1
                self._created[p.name] = created
                continue
            self._create_failed[p.name] = result.reason or result.outcome.value
            if result.outcome is CreateOutcome.UNKNOWN:
                self.ledger.unknown(p.name, create_id, self.clock())
                self.metrics.error("kubernetes_create_unknown")
                log.warning(
                    "creating a Job for %s: outcome unknown (%s); creating nothing "
                    "more for it until the Job cache shows whether it exists",
                    p.name,
                    result.reason,
                )
            else:
                self.metrics.error("kubernetes_create")
                log.warning("creating a Job for %s was refused: %s", p.name, result.reason)
            if result.retry_after is not None:
                self._create_not_before = self.clock() + result.retry_after
                log.warning("creating no Job for %.0f s (Retry-After)", result.retry_after)
            break
        return created

    def _trim_failed(self, snapshot: CacheSnapshot) -> None:
        for p in self.config.pipelines:
            failed = snapshot.failed.get(p.name, [])
            excess = len(failed) - p.settings.failed_jobs_history_limit
            if excess <= 0:
                continue
            for record in oldest_first(failed)[:excess]:
                try:
                    self.jobs.delete_failed_job(record)
                except Exception as e:
                    self.metrics.error("kubernetes_delete")
                    log.warning("deleting failed Job %s: %s", record.name, e)
                    return
                self.metrics.failed_jobs_deleted.labels(p.name).inc()
                log.info(
                    "deleted failed Job %s (beyond failedJobsHistoryLimit %d)",
                    record.name,
                    p.settings.failed_jobs_history_limit,
                )


def oldest_waiting_age(reading: QueueReading, now: float) -> float:
    """0 when nothing waits (by the live count, fresher than the estimate's)."""
    since = reading.oldest_waiting_since
    if reading.ready == 0 or since is None:
        return 0.0
    return max(0.0, now - since)


def oldest_first(records: Sequence[JobRecord]) -> list[JobRecord]:
    # RFC 3339 UTC timestamps of one apiserver sort as text.
    return sorted(records, key=lambda r: (r.failed_at, r.name))


def _describe(o: Observation) -> str:
    return f"ready={o.ready} unacked={o.unacked} active={o.active_jobs}"
