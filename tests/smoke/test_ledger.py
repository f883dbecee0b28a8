"""The chaos run's ledger (jobtide_testbed/ledger.py) and its handler (ledger_handler): the
handler, run by the worker library's local runner, posts each attempt to a real ledger
server; the server kills a doomed pod at its next start; the verdicts count lost, rerun and
dead-lettered tasks and the stall around a disruption."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from types import ModuleType

import pytest
import requests
from jobtide_testbed.images import LEDGER_HANDLER_DIR
from jobtide_testbed.ledger import Event, Exposure, Ledger, stall, summarize
from jobtide_worker import run_local

pytestmark = pytest.mark.unit


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    with Ledger("127.0.0.1") as running:
        yield running


@pytest.fixture
def handler(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("LEDGER_URL", ledger.url)
    path = LEDGER_HANDLER_DIR / "handler.py"
    spec = importlib.util.spec_from_file_location("ledger_handler", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def post(url: str, body: object) -> int:
    return requests.post(url, data=json.dumps(body), timeout=5).status_code


def test_the_handler_posts_each_attempt_and_dead_letters_poison(
    ledger: Ledger, handler: ModuleType
) -> None:
    tasks = [{"id": "a", "seconds": 0}, {"id": "p", "poison": True}, {"id": "b", "seconds": 0.01}]
    result = run_local(handler.handle, tasks, queue="alpha")

    assert [d.task["id"] for d in result.dead_letters] == ["p"]
    events = [(e.event, e.task, e.queue, e.attempt) for e in ledger.events()]
    assert events == [
        ("start", "a", "alpha", 1), ("done", "a", "alpha", 1),
        ("start", "p", "alpha", 1), ("poison", "p", "alpha", 1),
        ("start", "b", "alpha", 1), ("done", "b", "alpha", 1),
    ]  # fmt: skip
    assert {e.pod for e in ledger.events()} == {handler.POD}
    assert ledger.busy_pods() == []
    summary = summarize(ledger.events(), {"a", "b"}, {"p"}, [])
    assert (summary.done, summary.runs, summary.lost, summary.poison_missing) == (2, 2, [], [])


def test_a_doomed_pod_is_killed_at_its_next_start_only(ledger: Ledger) -> None:
    killed: list[str] = []
    ledger.doom("w1", lambda: killed.append("w1"))
    base = {"queue": "q", "container": "c1", "attempt": 1}
    assert post(ledger.url, {**base, "event": "start", "task": "t0", "pod": "w2"}) == 204
    assert killed == []
    post(ledger.url, {**base, "event": "start", "task": "t1", "pod": "w1"})
    post(ledger.url, {**base, "event": "start", "task": "t2", "pod": "w1"})

    assert killed == ["w1"]
    assert [(k.pod, k.task) for k in ledger.kills] == [("w1", "t1")]
    # w1 died in its task: not busy any more; w2 is.
    assert ledger.busy_pods() == ["w2"]
    assert ledger.pods() == {"w2": "c1", "w1": "c1"}


def test_a_post_the_ledger_cannot_read_is_refused_and_kept(ledger: Ledger) -> None:
    assert post(ledger.url, {"event": "finished", "task": "t"}) == 400
    assert post(ledger.url, {"event": "done"}) == 400
    assert ledger.events() == []
    assert len(ledger.rejected) == 2
    assert "event: 'finished'" in ledger.rejected[0]


def event(at: float, kind: str, task: str, pod: str = "w") -> Event:
    return Event(at=at, event=kind, task=task, queue="q", pod=pod, container="", attempt=1)


def test_summary_counts_lost_reruns_and_explains_them_by_exposures() -> None:
    events = [
        event(1, "done", "a", "w1"),
        event(5, "done", "b", "w1"),  # ack lost in the broker's restart: run again below
        event(9, "done", "b", "w2"),
        event(12, "done", "c", "w3"),  # run again with nothing to explain it
        event(14, "done", "c", "w4"),
        event(15, "poison", "p"),
        event(16, "done", "q"),  # a poison task that was not dead-lettered
    ]
    broker = Exposure("broker restarted", began=4, ended=8)
    other_pod = Exposure("worker deleted", began=11, ended=13, pod="w9")
    summary = summarize(events, {"a", "b", "c", "d"}, {"p", "q", "r"}, [broker, other_pod])

    assert summary.lost == ["d"]
    assert (summary.done, summary.runs, summary.duplicated) == (4, 6, 2)
    assert summary.unexplained == ["c"]
    assert (summary.poison_done, summary.poison_missing) == (["q"], ["q", "r"])
    assert summary.lines()[2] == "  done more than once: 2 tasks (2 extra runs, 1 unexplained)"
    # Once the pod's deletion covers w3's run, c is explained too.
    w3 = Exposure("worker deleted", began=11, ended=13, pod="w3")
    assert summarize(events, {"a", "b", "c"}, set(), [broker, w3]).unexplained == []


def test_stall_is_the_longest_gap_in_consumption_around_a_disruption() -> None:
    times = [1.0, 2.0, 3.0, 10.0, 11.0, 11.5, 20.0]
    assert stall(times, began=3.5, ended=10.5) == 7.0  # 3 -> 10
    assert stall(times, began=11.2, ended=11.3) == 0.5  # within a steady stretch
    assert stall(times, began=12, ended=13) == 8.5  # 11.5 -> 20
    # No done after it yet: counted to its end.
    assert stall([1.0, 2.0], began=2.5, ended=9.0) == 7.0
