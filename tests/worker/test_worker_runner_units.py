"""The runner's threads and bookkeeping on a fake connection (fakebroker.py): what only a
broker exercised before, made to happen at a chosen instant. The same behaviour against the
real broker is in test_worker_runner.py."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fakebroker import FakeBroker
from jobtide_testbed.process import wait_for
from jobtide_worker import BrokerConfig, Task, WorkerConfig
from jobtide_worker.handover import State
from jobtide_worker.logs import EventLog
from jobtide_worker.priority import MAX_PRIORITY
from jobtide_worker.runner import EXIT_BROKER, Runner

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

WAIT = 10.0  # the longest a test waits for the runner to reach a point


def config(**overrides: Any) -> WorkerConfig:
    settings: dict[str, Any] = {
        "broker": BrokerConfig(host="fake"),
        "queue": "q",
        "pipeline": "q",
        "idle_timeout_seconds": 0.3,
        # No management API behind the fake broker: an idle worker reads no queue counters.
        "quiet_check_seconds": 0,
        "declare_topology": False,
        "worker_name": "unit",
        **overrides,
    }
    return WorkerConfig(**settings)


class Run:
    """A Runner on a fake broker, its log captured; `handled` lists the task ids run."""

    def __init__(self, broker: FakeBroker, handler: Callable[[Task], None] | None = None) -> None:
        self.broker = broker
        self.stream = io.StringIO()
        self.handled: list[Any] = []
        self.handler_threads: set[threading.Thread] = set()
        self._handler = handler

    def handle(self, task: Task) -> None:
        self.handler_threads.add(threading.current_thread())
        self.handled.append(task.json["id"])
        if self._handler is not None:
            self._handler(task)

    def run(self, **settings: Any) -> int:
        self.runner = Runner(
            self.handle,
            config(**settings),
            EventLog("json", self.stream),
            self.broker.open_connection,
        )
        return self.runner.run()

    def lines(self, message: str | None = None) -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return [e for e in entries if message is None or e["message"] == message]

    def outcomes(self) -> list[str]:
        return [e["outcome"] for e in self.lines("task")]

    def exit_reason(self) -> str:
        [exiting] = self.lines("worker exiting")
        reason: str = exiting["reason"]
        return reason


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def no_thread_left() -> Iterator[None]:
    """The test's runner leaves no thread of its own behind once it has returned."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before]
    for thread in left:
        thread.join(WAIT)
    assert [t.name for t in left if t.is_alive()] == []


def publish(broker: FakeBroker, *ids: Any) -> list[str]:
    return [broker.publish(json.dumps({"id": i}).encode()) for i in ids]


@pytest.mark.usefixtures("no_thread_left")
def test_every_task_is_run_once_and_acked_then_the_worker_exits_idle(broker: FakeBroker) -> None:
    message_ids = publish(broker, 1, 2, 3)
    run = Run(broker)
    assert run.run() == 0
    assert run.handled == [1, 2, 3]
    assert broker.acked == message_ids
    assert run.outcomes() == ["done"] * 3
    assert run.exit_reason() == "idle"
    assert not broker.ready


@pytest.mark.parametrize(
    ("prefetch", "acks"),
    [
        (1, [1, 2, 3, 4, 5, 6, 7, 8]),  # each success at once: the next task needs the slot
        (4, [2, 4, 6, 8]),  # half the prefetch window at a time
    ],
)
def test_successes_are_acked_in_batches_of_half_the_prefetch(
    broker: FakeBroker, prefetch: int, acks: list[int]
) -> None:
    message_ids = publish(broker, *range(8))
    run = Run(broker)
    assert run.run(prefetch=prefetch) == 0
    assert [c[1:] for c in broker.calls if c[0] == "ack"] == [(tag, True) for tag in acks]
    assert broker.acked == message_ids


def test_held_acks_go_out_before_a_failures_nack(broker: FakeBroker) -> None:
    def fail_the_second(task: Task) -> None:
        if task.json["id"] == "b" and task.attempt == 1:
            raise RuntimeError("transient")

    publish(broker, "a", "b")
    run = Run(broker, fail_the_second)
    assert run.run(prefetch=4) == 0
    settles = [c for c in broker.calls if c[0] in ("ack", "nack")]
    # a's ack, held for a batch, is sent before b's nack; b comes back as tag 3.
    assert settles == [("ack", 1, True), ("nack", 2), ("ack", 3, True)]
    assert run.handled == ["a", "b", "b"]
    assert run.outcomes() == ["done", "retry", "done"]


@pytest.mark.usefixtures("no_thread_left")
@pytest.mark.parametrize("fault", ["channel closed", "connection dropped"])
def test_a_result_from_a_lost_channel_is_never_acked_on_the_next_one(
    broker: FakeBroker, fault: str
) -> None:
    """The broker requeues the running task when its channel goes. The runner must not ack
    the old delivery tag on the new channel (the fake fails on an unknown tag): it logs
    ack-lost, reconnects, and acks the redelivery without running the task again."""
    started, resume = threading.Event(), threading.Event()

    def slow(task: Task) -> None:
        if task.json["id"] == "long":
            started.set()
            assert resume.wait(WAIT)

    def break_mid_task() -> None:
        assert started.wait(WAIT)
        channel = broker.consuming_channel()
        if fault == "channel closed":
            broker.close_consuming_channel(
                "PRECONDITION_FAILED - delivery acknowledgement timed out"
            )
        else:
            broker.drop_connection()
        # The main thread's keep-alive reads the socket while the handler runs.
        wait_for(lambda: channel.is_closed, timeout=WAIT, what="the fault seen by the client")
        resume.set()

    [message_id] = publish(broker, "long")
    publish(broker, "next")
    breaker = threading.Thread(target=break_mid_task)
    breaker.start()
    run = Run(broker, slow)
    assert run.run() == 0
    breaker.join()

    assert run.handled == ["long", "next"]
    assert run.outcomes() == ["ack-lost", "duplicate", "done"]
    assert broker.acked[0] == message_id
    assert len(broker.connections) == 2
    assert not broker.connections[0].is_open
    # The same consume arguments (timeout, priority) on both channels.
    consumes = [c[1] for c in broker.calls if c[0] == "consume"]
    assert len(consumes) == 2
    assert consumes[0] == consumes[1]
    warnings = [e["message"] for e in run.lines() if e["level"] == "warning"]
    expected = (
        "channel closed by the broker; reopening"
        if fault == "channel closed"
        else "connection lost"
    )
    assert expected in warnings


@pytest.mark.usefixtures("no_thread_left")
def test_sigterm_during_a_task_lets_it_finish_and_takes_nothing_more(broker: FakeBroker) -> None:
    def signal_itself(task: Task) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        # The signal is handled on the main thread; finish once it has been.
        handover = run.runner.handover
        wait_for(lambda: handover.state is State.SIGTERM, timeout=WAIT, what="SIGTERM handled")

    [first, second] = publish(broker, 1, 2)
    run = Run(broker, signal_itself)
    sigterm_before = signal.getsignal(signal.SIGTERM)
    assert run.run(prefetch=2, idle_timeout_seconds=30) == 0

    assert run.handled == [1]
    assert broker.acked == [first]
    # Cancelled before the ack, so the broker sends nothing that would only come back.
    kinds = [c[0] for c in broker.calls]
    assert kinds == ["consume", "cancel", "ack"]
    assert [m.message_id for m in broker.ready] == [second]
    assert run.exit_reason() == "sigterm"
    assert signal.getsignal(signal.SIGTERM) is sigterm_before


@pytest.mark.usefixtures("no_thread_left")
def test_a_task_past_the_grace_is_given_up_and_its_thread_ends_when_the_handler_returns(
    broker: FakeBroker,
) -> None:
    resume = threading.Event()

    def stuck(task: Task) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        assert resume.wait(WAIT)

    [message_id] = publish(broker, "stuck")
    run = Run(broker, stuck)
    assert run.run(shutdown_grace_seconds=0.2, idle_timeout_seconds=30) == 0

    # run() returned while the handler still runs: the connection is closed under it and the
    # broker has the task back.
    [connection] = broker.connections
    assert not connection.is_open
    assert [m.message_id for m in broker.ready] == [message_id]
    assert [e["message"] for e in run.lines() if e["level"] == "warning"] == [
        "task still running at shutdown; requeued"
    ]
    assert run.exit_reason() == "sigterm"
    [handler_thread] = run.handler_threads
    assert handler_thread.is_alive()
    lines_at_return = run.lines()

    resume.set()
    handler_thread.join(WAIT)
    assert not handler_thread.is_alive()
    # The thread ended without touching the connection or writing another line.
    assert run.lines() == lines_at_return
    assert broker.acked == []
    assert [c[0] for c in broker.calls] == ["consume"]


@pytest.mark.usefixtures("no_thread_left")
def test_max_lifetime_gives_up_a_task_running_past_max_task_seconds(broker: FakeBroker) -> None:
    resume = threading.Event()
    publish(broker, "endless")
    run = Run(broker, lambda task: resume.wait(WAIT) and None)
    try:
        assert run.run(max_lifetime_seconds=1.0, max_task_seconds=0.2, idle_timeout_seconds=30) == 0
    finally:
        resume.set()
    assert run.handled == ["endless"]
    assert "task still running at shutdown; requeued" in [e["message"] for e in run.lines()]
    assert run.exit_reason() == "max-lifetime"
    assert broker.acked == []
    assert len(broker.ready) == 1


@pytest.mark.usefixtures("no_thread_left")
def test_a_broker_that_stays_away_ends_the_run_with_exit_4(broker: FakeBroker) -> None:
    broker.refuse_connections = True
    run = Run(broker)
    assert run.run(reconnect_seconds=0.6) == EXIT_BROKER
    messages = [e["message"] for e in run.lines()]
    assert "broker unreachable, retrying" in messages
    assert messages[-1] == "broker unreachable, giving up"


@pytest.mark.usefixtures("no_thread_left")
def test_an_error_in_the_main_loop_stops_the_consumer_thread_too(broker: FakeBroker) -> None:
    class Broken(Exception):
        pass

    class BreakingLog(EventLog):
        def flush(self) -> None:
            raise Broken

    publish(broker, 1)
    runner = Runner(
        lambda task: None,
        config(idle_timeout_seconds=30),
        BreakingLog("json", io.StringIO()),
        broker.open_connection,
    )
    with pytest.raises(Broken):
        runner.run()


@pytest.mark.parametrize(("mode", "sent"), [("node", True), ("age", True), ("none", False)])
def test_the_consumer_priority_is_sent_only_when_asked_for(
    broker: FakeBroker, mode: str, sent: bool
) -> None:
    run = Run(broker)
    assert run.run(consumer_priority=mode) == 0
    [arguments] = [c[1] for c in broker.calls if c[0] == "consume"]
    assert ("x-priority" in arguments) is sent
    if sent:
        assert 0 <= arguments["x-priority"] <= MAX_PRIORITY
    [consuming] = run.lines("consuming")
    assert consuming["priority"] == arguments.get("x-priority", "none")
