"""The chaos run's ledger: a small HTTP server on the host that the ledger handler (the
`ledger_handler` image, images.LEDGER_IMAGE) posts every attempt to, outside the worker, and
the verdicts read from it. A worker killed or restarted cannot take its record with it.

Each post is one event, stamped on arrival with the host's monotonic clock (the clock the
test times its disruptions with): `start` as the handler begins a task, `done` when it has
finished it (before the worker acknowledges it), `poison` before it dead-letters a poison task.

The server can also kill a worker mid-task: `doom(pod, kill)` runs `kill` when that pod
next posts `start`, before the server answers, so the handler is waiting in the middle of
its task when its process dies.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

EVENTS = ("start", "done", "poison")


@dataclass(frozen=True)
class Event:
    at: float  # time.monotonic() on the host when the post arrived
    event: str
    task: str
    queue: str
    pod: str
    container: str  # the worker container's id (containerd's task of the pod)
    attempt: int

    @classmethod
    def parse(cls, at: float, body: Mapping[str, Any]) -> Event:
        if body.get("event") not in EVENTS:
            raise ValueError(f"event: {body.get('event')!r} is not one of {EVENTS}")
        return cls(
            at=at,
            event=str(body["event"]),
            task=str(body["task"]),
            queue=str(body.get("queue", "")),
            pod=str(body.get("pod", "")),
            container=str(body.get("container", "")),
            attempt=int(body.get("attempt", 0)),
        )


@dataclass(frozen=True)
class Kill:
    at: float
    pod: str
    task: str  # the task whose start the kill answered


class Ledger:
    """The HTTP ledger on `host` (the node address, so pods reach it); `url` is what the
    handler posts to. Use as a context manager."""

    def __init__(self, host: str) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._doomed: dict[str, Callable[[], None]] = {}
        self.kills: list[Kill] = []
        self.rejected: list[str] = []
        self._server = ThreadingHTTPServer((host, 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ledger", daemon=True
        )
        self.url = f"http://{host}:{self._server.server_address[1]}/attempt"

    def __enter__(self) -> Ledger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def pods(self) -> dict[str, str]:
        """Every pod that posted so far, in the order first seen, with its container id."""
        seen: dict[str, str] = {}
        for event in self.events():
            seen.setdefault(event.pod, event.container)
        return seen

    def busy_pods(self) -> list[str]:
        """Pods in the middle of a task: their latest event is a `start` (and no kill
        answered it)."""
        latest: dict[str, str] = {}
        for event in self.events():
            latest[event.pod] = event.event
        killed = {kill.pod for kill in self.kills}
        return [pod for pod, event in latest.items() if event == "start" and pod not in killed]

    def done_count(self) -> int:
        return len({e.task for e in self.events() if e.event == "done"})

    def doom(self, pod: str, kill: Callable[[], None]) -> None:
        """Run `kill` when `pod` next posts a `start` (once)."""
        with self._lock:
            self._doomed[pod] = kill

    def record(self, body: Mapping[str, Any]) -> None:
        event = Event.parse(time.monotonic(), body)
        with self._lock:
            self._events.append(event)
            kill = self._doomed.pop(event.pod, None) if event.event == "start" else None
        if kill is not None:
            kill()
            with self._lock:
                self.kills.append(Kill(time.monotonic(), event.pod, event.task))


def _handler_for(ledger: Ledger) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length", "0"))
                ledger.record(json.loads(self.rfile.read(length)))
            except (ValueError, KeyError, TypeError) as error:
                ledger.rejected.append(repr(error))
                self._answer(400)
                return
            self._answer(204)

        def _answer(self, status: int) -> None:
            # The poster may be dead by now (a kill answered its start).
            with contextlib.suppress(OSError):
                self.send_response(status)
                self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: a run posts thousands of lines."""

    return Handler


# --- verdicts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Exposure:
    """A disruption that may lose the acknowledgement of a task already done: a done in
    [began, ended] by `pod` (any pod when None, e.g. the broker restarting) may be run again."""

    name: str
    began: float
    ended: float
    pod: str | None = None

    def covers(self, event: Event) -> bool:
        return self.began <= event.at <= self.ended and self.pod in (None, event.pod)


@dataclass(frozen=True)
class Summary:
    tasks: int  # expected to be done
    poison: int  # expected to be dead-lettered
    started: int  # attempts begun
    done: int  # tasks done at least once
    runs: int  # done events
    lost: list[str]  # expected, never done
    poison_done: list[str]  # poison tasks that were not dead-lettered
    poison_missing: list[str]  # poison tasks the handler never saw
    duplicated: int  # tasks done more than once
    unexplained: list[str]  # tasks run again with no disruption to explain it

    def lines(self) -> list[str]:
        return [
            f"ledger: {self.tasks} tasks and {self.poison} poison tasks published; "
            f"{self.started} attempts started, {self.runs} runs done",
            f"  done at least once: {self.done}; lost: {len(self.lost)}",
            f"  done more than once: {self.duplicated} tasks "
            f"({self.runs - self.done} extra runs, {len(self.unexplained)} unexplained)",
            f"  poison dead-lettered: {self.poison - len(self.poison_missing)}"
            f" of {self.poison}, run to done: {len(self.poison_done)}",
        ]


def summarize(
    events: Iterable[Event],
    expected: Iterable[str],
    poison: Iterable[str],
    exposures: Iterable[Exposure],
) -> Summary:
    """The ledger's verdict on a run that published `expected` tasks and `poison` ones. A
    task's run is explained again when every done of it but the last fell in an exposure."""
    events = sorted(events, key=lambda e: e.at)
    exposures = list(exposures)
    expected, poison = set(expected), set(poison)
    dones: dict[str, list[Event]] = {}
    for event in events:
        if event.event == "done":
            dones.setdefault(event.task, []).append(event)
    poisoned = {e.task for e in events if e.event == "poison"}
    unexplained = [
        task
        for task, runs in dones.items()
        if not all(any(x.covers(run) for x in exposures) for run in runs[:-1])
    ]
    runs = Counter({task: len(found) for task, found in dones.items()})
    return Summary(
        tasks=len(expected),
        poison=len(poison),
        started=sum(1 for e in events if e.event == "start"),
        done=len(dones),
        runs=sum(runs.values()),
        lost=sorted(expected - set(dones)),
        poison_done=sorted(poison & set(dones)),
        poison_missing=sorted(poison - poisoned),
        duplicated=sum(1 for count in runs.values() if count > 1),
        unexplained=sorted(unexplained),
    )


def stall(done_times: Iterable[float], began: float, ended: float) -> float:
    """How long consumption stopped around a disruption: the longest gap between two
    consecutive `done` events that overlaps [began, ended] (from the last done before it to
    `ended` if none came after)."""
    times = sorted(done_times)
    longest = 0.0
    for earlier, later in itertools.pairwise(times):
        if later >= began and earlier <= ended:
            longest = max(longest, later - earlier)
    before = [t for t in times if t <= ended]
    if before and before[-1] == times[-1]:
        longest = max(longest, ended - before[-1])
    return longest
