"""The status view's data and its formatting. Pure: no Kubernetes, no clock of its own.

The leader publishes its latest cycle's figures per pipeline as one JSON document (the
"status document", `StatusDocument`) in a ConfigMap of the release that the chart creates
empty; `python -m jobtide_scaler status` (statuscmd.py) reads it with the user's kubeconfig,
together with the Lease (who leads now) and the worker Jobs (how many run now), and prints
`format_table` or `format_json`. Nothing secret goes into it: counts, names and decisions.

The document is written when a pipeline's decision changes (its result, the cap that holds it,
whether its broker counts are fresh), and otherwise at most every `refresh_seconds`: one small
write per release every few seconds at most, and figures that say how old they are. Figures
older than `stale_after` are flagged: the scaler is down, no replica leads, or it cannot write.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from jobtide_worker.pipeline_settings import PipelineSettings

from jobtide_scaler.jobstate import JobCounts
from jobtide_scaler.policy import Observation, desired_workers

# The document's key in the ConfigMap, and the version of its layout.
STATUS_KEY = "status.json"
STATUS_VERSION = 1
# Seconds between two writes of unchanged decisions.
REFRESH_SECONDS = 15.0
# What the `decision` of a pipeline means (the `result` of jobtide_decisions_total).
DECISIONS = {
    "create": "created worker Jobs",
    "none": "no new worker needed",
    "dry_run": "would create worker Jobs (dry run)",
    "stale": "no fresh broker counts: creating nothing",
    "in_doubt": "an earlier create's outcome is unknown: creating nothing until the Job "
    "cache shows it",
    "not_leader": "another replica decides",
    "cache_unsynced": "the Job cache is not synced: creating nothing",
    "owner_unknown": "the Deployment that owns the worker Jobs cannot be read yet",
    "throttled": "the apiserver asked to wait (429, Retry-After): creating nothing until then",
}


def rfc3339(seconds: float) -> str:
    """UTC, to the second, as the apiserver writes times."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class PipelineStatus:
    queue: str
    ready: int | None  # None: no counts from the broker yet
    in_flight: int | None
    dead_lettered: int | None
    # The oldest waiting message's age at the time of writing, a lower bound (backlog.py);
    # None when the broker keeps no message statistics.
    oldest_age_seconds: float | None
    broker_fresh: bool
    active: int
    pending: int
    max_workers: int
    desired: int  # workers the backlog wants, within the pipeline's own caps
    decision: str
    reason: str
    cap: str | None = None  # "maxWorkers" or "maxTotalWorkers" when one holds it
    created: int = 0  # Jobs created this cycle
    last_created: int = 0  # Jobs created in the latest cycle that created any
    last_created_at: str | None = None


@dataclass(frozen=True)
class StatusDocument:
    release: str
    namespace: str
    writer: str  # the identity of the replica that wrote it (the Lease holder's)
    lease_name: str | None  # None: leader election is off
    written_at: str
    refresh_seconds: float
    poll_interval_seconds: float
    max_total_workers: int
    pipelines: dict[str, PipelineStatus] = field(default_factory=dict)
    version: int = STATUS_VERSION

    def to_json(self) -> str:
        return json.dumps(_camel(asdict(self)), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StatusDocument:
        raw = _snake(json.loads(text))
        if raw.get("version") != STATUS_VERSION:
            raise ValueError(f"status document version {raw.get('version')!r} is not known")
        # A version may gain fields: a reader older than the writer skips those it lacks.
        pipelines = {
            name: PipelineStatus(**_known(PipelineStatus, p))
            for name, p in raw.pop("pipelines").items()
        }
        return cls(**_known(cls, raw), pipelines=pipelines)

    def stale_after(self) -> float:
        """Seconds after `written_at` beyond which the figures are no longer being refreshed:
        two missed writes plus a cycle."""
        return 2 * self.refresh_seconds + self.poll_interval_seconds


def _known(kind: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(kind)}
    return {key: value for key, value in raw.items() if key in names}


def _camel(value: Any) -> Any:
    if isinstance(value, dict):
        return {_to_camel(k) if "_" in k else k: _camel(v) for k, v in value.items()}
    return value


def _snake(value: Any) -> Any:
    if isinstance(value, dict):
        return {_to_snake(k): _snake(v) for k, v in value.items()}
    return value


def _to_camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part.title() for part in rest)


def _to_snake(key: str) -> str:
    if key != key.lower() and "-" not in key:
        return "".join(f"_{c.lower()}" if c.isupper() else c for c in key)
    return key  # a pipeline name (DNS label): kept as it is


def explain(
    decision: str,
    settings: PipelineSettings,
    observation: Observation,
    created: int,
    cap: str | None,
    max_total_workers: int,
) -> str:
    """One line on why the pipeline got this decision, for people."""
    backlog = observation.ready + observation.unacked
    desired = desired_workers(settings, observation)
    if decision not in ("create", "none", "dry_run"):
        return DECISIONS.get(decision, decision)
    covers = f"backlog {backlog} wants {desired} worker(s), {observation.active_jobs} active"
    if cap == "maxWorkers":
        return f"{covers}: held at maxWorkers {settings.max_workers}"
    if cap == "maxTotalWorkers":
        held = f"{covers}: held at maxTotalWorkers {max_total_workers}"
        return held + (f" after creating {created}" if created else "")
    if decision == "create":
        return f"{covers}: created {created}"
    if decision == "dry_run":
        return f"{covers}: dry run, created nothing"
    if desired > observation.active_jobs:
        return f"{covers}: at most maxNewPerCycle {settings.max_new_per_cycle} a cycle"
    return covers


def signature(document: StatusDocument) -> tuple[tuple[str, str, str | None, bool], ...]:
    """What a change of must be published at once."""
    return tuple(
        (name, p.decision, p.cap, p.broker_fresh) for name, p in sorted(document.pipelines.items())
    )


@dataclass
class StatusThrottle:
    """When to write the document: on a changed decision, else every `refresh_seconds`."""

    refresh_seconds: float = REFRESH_SECONDS
    _last: tuple[Any, ...] | None = None
    _written_at: float | None = None

    def due(self, document: StatusDocument, now: float) -> bool:
        if self._written_at is None or signature(document) != self._last:
            return True
        return now - self._written_at >= self.refresh_seconds

    def written(self, document: StatusDocument, now: float) -> None:
        self._last, self._written_at = signature(document), now


def with_last_created(
    document: StatusDocument, previous: Mapping[str, tuple[int, str]]
) -> StatusDocument:
    """Each pipeline's latest creating cycle, from `previous` where this one created none."""
    pipelines = {}
    for name, p in document.pipelines.items():
        if p.created:
            pipelines[name] = replace(
                p, last_created=p.created, last_created_at=document.written_at
            )
        elif name in previous:
            count, at = previous[name]
            pipelines[name] = replace(p, last_created=count, last_created_at=at)
        else:
            pipelines[name] = p
    return replace(document, pipelines=pipelines)


# --- the view: the document, the Lease and the live Jobs, as the command shows them ---------


@dataclass(frozen=True)
class LeaseInfo:
    holder: str | None
    renewed_at: float | None  # epoch seconds
    duration_seconds: float | None


@dataclass(frozen=True)
class StatusView:
    release: str
    namespace: str
    document: StatusDocument | None
    lease: LeaseInfo | None = None
    # Per pipeline, from the Job list made for this view; None when it could not be read.
    jobs: dict[str, JobCounts] | None = None
    # What could not be read, for the footnotes ("Lease: Forbidden").
    problems: tuple[str, ...] = ()


def view_json(view: StatusView, now: float) -> dict[str, Any]:
    """The view as one JSON-ready mapping: what `-o json` prints and the table shows."""
    doc = view.document
    result: dict[str, Any] = {
        "release": view.release,
        "namespace": view.namespace,
        "leader": _leader(view, now),
        "figures": None,
        "pipelines": {},
        "problems": list(view.problems),
    }
    live = view.jobs or {}
    if doc is not None:
        age = max(0.0, now - parse_rfc3339(doc.written_at))
        result["figures"] = {
            "writtenAt": doc.written_at,
            "ageSeconds": round(age, 1),
            "stale": age > doc.stale_after(),
            "staleAfterSeconds": doc.stale_after(),
            "writer": doc.writer,
        }
        result["maxTotalWorkers"] = doc.max_total_workers
        for name, p in sorted(doc.pipelines.items()):
            entry = _camel(asdict(p))
            if view.jobs is not None:
                jobs = live.get(name, JobCounts())
                entry["active"], entry["pending"] = jobs.active, jobs.pending
            entry["workersFrom"] = "jobs" if view.jobs is not None else "figures"
            result["pipelines"][name] = entry
    for name, jobs in sorted(live.items()):
        if name not in result["pipelines"]:
            # Worker Jobs of a pipeline the figures do not know (none yet, or removed).
            result["pipelines"][name] = {
                "active": jobs.active,
                "pending": jobs.pending,
                "workersFrom": "jobs",
            }
    if doc is not None and view.jobs is not None:
        result["activeTotal"] = sum(p["active"] for p in result["pipelines"].values())
    elif doc is not None:
        result["activeTotal"] = sum(p.active for p in doc.pipelines.values())
    return result


def _leader(view: StatusView, now: float) -> dict[str, Any]:
    doc, lease = view.document, view.lease
    if doc is not None and doc.lease_name is None:
        return {"identity": doc.writer, "source": "figures (leader election off)"}
    if lease is None:
        return {"identity": None, "source": "unknown"}
    if lease.holder is None or lease.renewed_at is None:
        return {"identity": None, "source": "lease"}
    age = max(0.0, now - lease.renewed_at)
    held = lease.duration_seconds is None or age <= lease.duration_seconds
    return {
        "identity": lease.holder if held else None,
        "source": "lease",
        "renewedSecondsAgo": round(age, 1),
        **({} if held else {"expiredHolder": lease.holder}),
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_table(view: StatusView, now: float) -> str:
    data = view_json(view, now)
    lines = [f"release {view.release} in namespace {view.namespace}"]
    leader = data["leader"]
    if leader["identity"] is None and leader.get("expiredHolder"):
        since = _duration(leader["renewedSecondsAgo"])
        lines.append(
            f"leader: none (Lease of {leader['expiredHolder']} expired, renewed {since} ago)"
        )
    elif leader["identity"] is None:
        lines.append("leader: none" if leader["source"] == "lease" else "leader: unknown")
    elif "renewedSecondsAgo" in leader:
        since = _duration(leader["renewedSecondsAgo"])
        lines.append(f"leader: {leader['identity']} (Lease renewed {since} ago)")
    else:
        lines.append(f"leader: {leader['identity']} (leader election off)")
    figures = data["figures"]
    if figures is None:
        lines.append(
            "figures: none yet (the scaler writes them once it leads; is it running? "
            f"kubectl get pods -n {view.namespace} -l app.kubernetes.io/instance={view.release})"
        )
    else:
        line = f"figures: {_duration(figures['ageSeconds'])} old, by {figures['writer']}"
        if figures["stale"]:
            line += (
                f"  STALE: older than {_duration(figures['staleAfterSeconds'])}; the scaler is "
                "down, no replica leads, or it cannot write them"
            )
        lines.append(line)
    rows = [
        ("PIPELINE", "READY", "IN FLIGHT", "DEAD", "OLDEST", "WORKERS", "PENDING", "DECISION",
         "REASON"),
    ]  # fmt: skip
    for name, p in data["pipelines"].items():
        workers = str(p["active"])
        if "maxWorkers" in p:
            workers += f"/{p['maxWorkers']}"
        decision = p.get("decision", "-")
        if decision == "none" and p.get("cap"):
            decision = "at cap"
        last = ""
        if p.get("lastCreatedAt") and decision != "create":
            ago = now - parse_rfc3339(p["lastCreatedAt"])
            last = f" (last created {p['lastCreated']} {_duration(ago)} ago)"
        rows.append((
            name,
            _number(p.get("ready")),
            _number(p.get("inFlight")),
            _number(p.get("deadLettered")),
            _duration(p.get("oldestAgeSeconds")),
            workers,
            str(p["pending"]),
            decision,
            (p.get("reason") or "no figures for this pipeline") + last,
        ))  # fmt: skip
    if "maxTotalWorkers" in data:
        rows.append(("(all)", "", "", "", "", f"{data['activeTotal']}/{data['maxTotalWorkers']}",
                     "", "", "maxTotalWorkers"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    numeric = {1, 2, 3, 4, 5, 6}
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row[:-1])
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    if not data["pipelines"]:
        lines.append("(no pipelines)")
    if figures is not None and view.jobs is not None:
        lines.append("WORKERS and PENDING: worker Jobs now; the other columns: the figures.")
    lines += [f"note: {problem}" for problem in view.problems]
    return "\n".join(lines) + "\n"


def format_json(view: StatusView, now: float) -> str:
    return json.dumps(view_json(view, now), sort_keys=True) + "\n"
