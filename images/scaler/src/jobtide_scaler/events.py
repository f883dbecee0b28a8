"""Which Kubernetes Events the scaler reports about each pipeline, and when. Pure: the loop
feeds it each cycle's facts and posts what it returns (cluster.Cluster.post_event) on the
scaler's Deployment, the owner of the worker Jobs, so `kubectl describe deployment` and
`kubectl get events` show them as they show KEDA's on a ScaledJob.

Events are for people, so they come on changes, not every cycle: a pipeline reaching a cap
or losing its broker counts is reported once, until it leaves that state; Job creations
are summed up at most once per `summary_seconds` per pipeline (the first at once), and so are
failed creates. Each reason is a contract for users' alerting and tooling (README)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class PipelineFacts:
    """What one cycle found and did for one pipeline."""

    pipeline: str
    queue: str
    broker_fresh: bool
    # The cap that held the pipeline below its backlog's demand (policy.limiting_cap).
    cap: str | None
    active_jobs: int
    backlog: int
    created: int
    # Why a create call failed this cycle, if one did.
    create_failed: str | None = None


@dataclass
class _State:
    fresh: bool = True
    cap: str | None = None
    created: int = 0  # created since the last JobsCreated event
    created_reported_at: float | None = None
    failed: str | None = None  # the latest failure not yet reported
    failed_count: int = 0
    failed_reported_at: float | None = None


@dataclass
class EventPolicy:
    summary_seconds: float = 60.0
    _states: dict[str, _State] = field(default_factory=dict)

    def observe(self, facts: PipelineFacts, now: float) -> list[Event]:
        state = self._states.setdefault(facts.pipeline, _State())
        events = self._broker(state, facts) + self._cap(state, facts)
        state.created += facts.created
        if state.created and _due(state.created_reported_at, now, self.summary_seconds):
            events.append(
                Event(
                    "JobsCreated",
                    f"created {state.created} worker Job(s) for pipeline {facts.pipeline} "
                    f"(now: backlog {facts.backlog}, {facts.active_jobs} active Job(s))",
                )
            )
            state.created, state.created_reported_at = 0, now
        if facts.create_failed is not None:
            state.failed, state.failed_count = facts.create_failed, state.failed_count + 1
        if state.failed and _due(state.failed_reported_at, now, self.summary_seconds):
            events.append(
                Event(
                    "JobCreateFailed",
                    f"creating a worker Job for pipeline {facts.pipeline} failed "
                    f"{state.failed_count} time(s): {state.failed}",
                    warning=True,
                )
            )
            state.failed, state.failed_count, state.failed_reported_at = None, 0, now
        return events

    @staticmethod
    def _broker(state: _State, facts: PipelineFacts) -> list[Event]:
        if facts.broker_fresh == state.fresh:
            return []
        state.fresh = facts.broker_fresh
        if not facts.broker_fresh:
            return [
                Event(
                    "BrokerCountsStale",
                    f"no fresh counts of queue {facts.queue} from the broker: creating no "
                    f"worker Job for pipeline {facts.pipeline} until they are back",
                    warning=True,
                )
            ]
        return [Event("BrokerCountsBack", f"counts of queue {facts.queue} are fresh again")]

    @staticmethod
    def _cap(state: _State, facts: PipelineFacts) -> list[Event]:
        if facts.cap == state.cap:
            return []
        state.cap = facts.cap
        if facts.cap is None:
            return []
        return [
            Event(
                "AtCap",
                f"pipeline {facts.pipeline} held at {facts.cap} with {facts.active_jobs} "
                f"active worker Job(s) and a backlog of {facts.backlog} message(s)",
            )
        ]


def _due(last: float | None, now: float, period: float) -> bool:
    return last is None or now - last >= period
