"""The consume loop: one handler, one task at a time, acked only after it succeeds.

Threads: pika connections are not thread-safe, so a lock says which thread may touch the
connection. The consumer thread holds it except while the user's handler runs: it connects,
reads deliveries, runs each task, acks, dead-letters and reconnects. At prefetch 1 a task thus
costs no hand-off between threads (ack, read the next delivery, call the handler, all on one
thread), which is what lets the runner keep up with a bare pika consumer. While a handler runs,
the main thread takes the lock a few times a second to service the connection: heartbeats, a
channel closed by the broker, and deliveries, which it only queues. So a task of an hour never
starves the heartbeats. The main thread also receives the signals, writes the task log lines
the consumer thread only queued, and, past the shutdown grace, closes the connection under a
task that is still running so that the broker requeues it. The consumer thread never
reconnects while a task runs: a redelivery taken then would sit unacked behind it (another
consumer timeout, another count towards the delivery limit).

Every delivery belongs to a channel generation. When a channel or connection is lost, the
broker requeues its unacked deliveries, so results of an older generation are never acked on
a newer channel: they are logged as `ack-lost` and the handler remembers their message ids, so
the redelivery of a task it already did is acked without running it again (on this worker;
another worker may run it again: handlers must be idempotent, as with any at-least-once queue).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]

from jobtide_worker import topology
from jobtide_worker.config import WorkerConfig
from jobtide_worker.logs import ERROR, INFO, WARNING, EventLog
from jobtide_worker.task import PermanentError, Task, UndecodableBody

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_HANDLER = 3
EXIT_BROKER = 4

HEADER_PREFIX = "x-jobtide-"
HANDLER_PATH = "/app"
_ERROR_TEXT_LIMIT = 1000
_REMEMBERED_DONE = 1000
# Longest wait for the broker before the consumer thread looks at stop reasons and limits.
_TICK_SECONDS = 0.5
# How often the main thread services the connection while a handler runs.
_KEEPALIVE_SECONDS = 0.2
_BACKOFF_FIRST_SECONDS = 0.5
_BACKOFF_CAP_SECONDS = 8.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Handler = Callable[[Task], object]

_CONNECTION_LOST = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionClosed,
    pika.exceptions.StreamLostError,
    ConnectionError,
    OSError,
)


class HandlerLoadError(Exception):
    pass


def load_handler(spec: str, path: str = HANDLER_PATH) -> Handler:
    """`module:function`, the module looked up on sys.path with `path` first."""
    module_name, _, function_name = spec.partition(":")
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise HandlerLoadError(f"cannot import {module_name!r}: {e!r}") from e
    function = getattr(module, function_name, None)
    if not callable(function):
        raise HandlerLoadError(f"{module_name!r} has no callable {function_name!r}")
    handler: Handler = function
    return handler


# NamedTuples rather than frozen dataclasses: a few are made for every task, and a frozen
# dataclass takes three times as long to make.
class _Delivery(NamedTuple):
    generation: int
    tag: int
    body: bytes
    properties: Any
    redelivered: bool


class _Outcome(NamedTuple):
    kind: str  # done | duplicate | retry | dead-letter
    attempt: int = 0
    seconds: float = 0.0
    reason: str = ""
    error: BaseException | None = None


class _ChannelLost(Exception):
    pass


class Runner:
    def __init__(self, handler: Handler, config: WorkerConfig, log: EventLog) -> None:
        self.handler = handler
        self.config = config
        self.log = log
        # Whoever holds it may touch the connection and its channels: the consumer thread,
        # except while a handler runs; the main thread only then.
        self._connection_lock = threading.Lock()
        self._pending: collections.deque[_Delivery] = collections.deque()
        self._generation = 0
        self._connection: Any = None
        self._channel: Any = None
        self._dead_letter_channel: Any = None
        self._consumer_tag: str | None = None
        self._tick_scheduled = False  # a wake-up timer is pending on the connection
        # Set by the main thread when servicing the connection during a task failed; the
        # consumer thread raises it once the task is over.
        self._connection_error: BaseException | None = None
        self._ack_upto = 0  # acks are batched: all tags up to this one succeeded
        self._ack_batch_limit = max(1, config.prefetch // 2)
        self._acks_held = 0  # successes not acked yet
        self._in_flight: _Delivery | None = None
        self._done_recently: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._received = 0
        self._finished = 0
        self._last_activity = time.monotonic()
        self._started = time.monotonic()
        self._stop_reason: str | None = None
        self._sigterm_at: float | None = None
        # Set by the main thread once a stop is requested: cuts a reconnect back-off short.
        self._stopping = threading.Event()
        self._consumer_result: int | BaseException | None = None

    # -- the main thread ----------------------------------------------------------------
    def run(self) -> int:
        with self._signals_handled():
            return self._run()

    def _run(self) -> int:
        self.log.event(INFO, "worker starting", **self.config.summary())
        consumer = threading.Thread(target=self._consumer_main, name="consumer", daemon=True)
        consumer.start()
        try:
            while True:
                consumer.join(_KEEPALIVE_SECONDS)
                if not consumer.is_alive():
                    break
                # The consumer thread defers its line per task: written here, off its path.
                self.log.flush()
                if self._requested_stop() is not None:
                    self._stopping.set()
                if self._running_task_overdue() and self._give_up_running_task():
                    return self._exit(EXIT_OK, self._requested_stop() or "max-lifetime")
                self._keep_connection_alive()
        finally:
            self.log.flush()
        result = self._consumer_result
        if isinstance(result, BaseException):
            raise result
        assert result is not None, "the consumer thread ended without an exit code"
        return result

    def _keep_connection_alive(self) -> None:
        """While a handler runs the consumer thread leaves the connection alone: service it
        here, so heartbeats flow and a channel closed by the broker is noticed. Deliveries
        read here are only queued; the consumer thread runs them."""
        if self._in_flight is None or not self._connection_lock.acquire(blocking=False):
            return
        try:
            connection = self._connection
            if (
                self._in_flight is not None
                and self._connection_error is None
                and connection is not None
                and connection.is_open
            ):
                connection.process_data_events(time_limit=0)
        except _CONNECTION_LOST as e:
            self._connection_error = e
        finally:
            self._connection_lock.release()

    def _running_task_overdue(self) -> bool:
        if self._in_flight is None:
            return False
        now = time.monotonic()
        sigterm_at = self._sigterm_at
        if sigterm_at is not None and now - sigterm_at > self.config.shutdown_grace_seconds:
            return True
        lifetime = self.config.max_lifetime_seconds
        return bool(lifetime) and now - self._started > lifetime + self.config.max_task_seconds

    def _give_up_running_task(self) -> bool:
        """Close the connection under the running task, so the broker requeues it. The lock
        is never released afterwards: the consumer thread must not touch the connection when
        the handler returns."""
        self._connection_lock.acquire()
        running = self._in_flight
        if running is None:
            # It finished meanwhile; the consumer thread stops by itself.
            self._connection_lock.release()
            return False
        self.log.event(
            WARNING,
            "task still running at shutdown; requeued",
            message_id=running.properties.message_id,
            grace_seconds=self.config.shutdown_grace_seconds
            if self._sigterm_at is not None
            else self.config.max_task_seconds,
        )
        self._close_quietly()
        return True

    @contextlib.contextmanager
    def _signals_handled(self) -> Iterator[None]:
        """SIGTERM and SIGINT stop the worker while it runs; the program's own handlers are
        back afterwards (run() is also a library call). Only the main thread may set them."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, _frame: types.FrameType | None) -> None:
            if self._sigterm_at is None:
                self._sigterm_at = time.monotonic()
            self._stop_reason = "sigterm"

        previous = {signum: signal.signal(signum, stop) for signum in _STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(signum, handler)

    # Both change behind mypy's back (signal handler, other thread): never narrow them.
    def _requested_stop(self) -> str | None:
        return self._stop_reason

    def _connection_failed(self) -> BaseException | None:
        return self._connection_error

    def _exit(self, code: int, reason: str) -> int:
        self.log.event(
            INFO,
            "worker exiting",
            reason=reason,
            exit_code=code,
            tasks=self._finished,
            seconds=round(time.monotonic() - self._started, 1),
        )
        return code

    # -- the consumer thread ------------------------------------------------------------
    def _consumer_main(self) -> None:
        try:
            with self._connection_lock:
                self._consumer_result = self._run_connected()
        except BaseException as e:
            self._consumer_result = e

    def _run_connected(self) -> int:
        lost_since: float | None = None
        backoff = _BACKOFF_FIRST_SECONDS
        while True:
            stop_reason = self._requested_stop()
            if stop_reason is not None:
                return self._exit(EXIT_OK, stop_reason)
            try:
                self._connect()
            except _CONNECTION_LOST as e:
                now = time.monotonic()
                lost_since = now if lost_since is None else lost_since
                remaining = self.config.reconnect_seconds - (now - lost_since)
                stop_reason = self._requested_stop()
                if stop_reason is not None:
                    return self._exit(EXIT_OK, stop_reason)
                if remaining <= 0:
                    self.log.event(
                        ERROR,
                        "broker unreachable, giving up",
                        seconds=round(now - lost_since, 1),
                        error=_describe(e),
                    )
                    return EXIT_BROKER
                self.log.event(
                    WARNING,
                    "broker unreachable, retrying",
                    retry_in=round(min(backoff, remaining), 1),
                    error=_describe(e),
                )
                self._stopping.wait(min(backoff, remaining))
                backoff = min(backoff * 2, _BACKOFF_CAP_SECONDS)
                continue
            lost_since, backoff = None, _BACKOFF_FIRST_SECONDS
            try:
                reason = self._consume()
            except _ChannelLost as e:
                self.log.event(
                    WARNING,
                    "channel closed by the broker; reopening",
                    error=str(e),
                )
                self._close_quietly()
                continue
            except _CONNECTION_LOST as e:
                self.log.event(WARNING, "connection lost", error=_describe(e))
                self._close_quietly()
                lost_since = time.monotonic()
                continue
            self._close_quietly()
            return self._exit(EXIT_OK, reason)

    def _connect(self) -> None:
        params = self.config.broker.connection_parameters(
            f"jobtide-worker {self.config.worker_name}"
        )
        connection = pika.BlockingConnection(params)
        try:
            if self.config.declare_topology:
                declaring = connection.channel()
                topology.declare(declaring, self.config.queue)
                declaring.close()
            dead_letter_channel = connection.channel()
            dead_letter_channel.confirm_delivery()
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self.config.prefetch)
            self._generation += 1
            self._connection = connection
            self._channel = channel
            self._dead_letter_channel = dead_letter_channel
            self._connection_error = None
            self._tick_scheduled = False
            # Time spent reconnecting is not idleness: the queue may have filled meanwhile.
            self._last_activity = time.monotonic()
            self._consumer_tag = channel.basic_consume(
                self.config.queue,
                self._on_message,
                arguments={
                    "x-consumer-timeout": topology.consumer_timeout_ms(self.config.max_task_seconds)
                },
            )
        except BaseException:
            with contextlib.suppress(Exception):
                connection.close()
            raise
        self.log.event(
            INFO,
            "consuming",
            queue=self.config.queue,
            prefetch=self.config.prefetch,
        )

    def _consume(self) -> str:
        """Run tasks until a reason to stop; raise when the channel or connection is lost.

        At prefetch 1 every task is a round trip (ack, next delivery), so the path from a
        handler's return to the next read does nothing that can wait: the task's log line is
        only queued, and written by the main thread."""
        while True:
            self._check_connection()
            reason = self._requested_stop() or self._limit_reached()
            if reason is not None:
                self._stop_reason = reason
                return self._drain(reason)
            if self._pending:
                self._run_task(self._pending.popleft())
            else:
                self._flush_acks()
                self._wait_for_broker()

    def _wait_for_broker(self) -> None:
        """Until a delivery or the next tick. The tick is a timer kept across calls, because a
        time limit per call costs a timer and, measured, half a poll more per task."""
        if not self._tick_scheduled:
            self._tick_scheduled = True
            self._connection.call_later(self._tick(), self._on_tick)
        self._connection.process_data_events(time_limit=None)

    def _on_tick(self) -> None:
        self._tick_scheduled = False

    def _check_connection(self) -> None:
        error = self._connection_failed()
        if error is not None:
            self._connection_error = None
            raise error
        if self._channel.is_closed:
            raise _ChannelLost(_closing_reason(self._channel))

    def _run_task(self, delivery: _Delivery) -> None:
        self._in_flight = delivery
        self._connection_lock.release()
        try:
            outcome = self._execute(delivery)
        finally:
            self._connection_lock.acquire()
            self._in_flight = None
        self._settle(delivery, outcome)

    def _tick(self) -> float:
        idle_left = self.config.idle_timeout_seconds - (time.monotonic() - self._last_activity)
        return max(0.0, min(_TICK_SECONDS, idle_left))

    def _limit_reached(self) -> str | None:
        cfg = self.config
        now = time.monotonic()
        if cfg.max_tasks and self._received >= cfg.max_tasks:
            return "max-tasks"
        if cfg.max_lifetime_seconds and now - self._started >= cfg.max_lifetime_seconds:
            return "max-lifetime"
        if not self._pending and now - self._last_activity >= cfg.idle_timeout_seconds:
            return "idle"
        return None

    def _drain(self, reason: str) -> str:
        """Stop taking messages and leave the rest unacked: closing the connection requeues
        them. For max-tasks the tasks already taken (all within the limit) are done first,
        unless SIGTERM comes meanwhile."""
        with contextlib.suppress(*_CONNECTION_LOST, pika.exceptions.AMQPChannelError):
            if self._consumer_tag is not None:
                self._channel.basic_cancel(self._consumer_tag)
        self._flush_acks()
        if reason == "max-tasks":
            while (
                self._pending
                and self._requested_stop() != "sigterm"
                and self._connection_failed() is None
                and self._channel.is_open
            ):
                self._run_task(self._pending.popleft())
            self._flush_acks()
        return reason

    def _close_quietly(self) -> None:
        self._lose_generation()
        with contextlib.suppress(Exception):
            if self._connection is not None and self._connection.is_open:
                self._connection.close()

    def _lose_generation(self) -> None:
        """Deliveries of the current channel are void from now on (the broker requeues them)."""
        self._generation += 1
        self._pending.clear()
        self._ack_upto = 0
        self._acks_held = 0

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        if self.config.max_tasks and self._received >= self.config.max_tasks:
            return  # beyond the limit: left unacked, the broker requeues it when we close
        self._received += 1
        self._last_activity = time.monotonic()
        self._pending.append(
            _Delivery(
                self._generation,
                method.delivery_tag,
                body,
                properties,
                bool(method.redelivered),
            )
        )

    def _settle(self, delivery: _Delivery, outcome: _Outcome) -> None:
        self._last_activity = time.monotonic()
        if (
            delivery.generation != self._generation
            or self._connection_failed() is not None
            or self._channel.is_closed
        ):
            if outcome.kind == "done":
                self._remember_done(delivery)
            self._log_task(
                delivery,
                _Outcome(
                    "ack-lost",
                    outcome.attempt,
                    outcome.seconds,
                    f"channel gone before {outcome.kind}",
                ),
            )
            return
        self._finished += 1
        if outcome.kind in ("done", "duplicate"):
            self._ack_upto = delivery.tag
            self._acks_held += 1
            if self._acks_held >= self._ack_batch_limit and self._requested_stop() is None:
                # Half the prefetch window acked at once: the broker refills it while the
                # held deliveries run. When stopping, the consumer is cancelled before the
                # ack, so the broker sends no task that would only be returned.
                self._flush_acks()
            # After the ack: at prefetch 1 this overlaps the broker's sending of the next task.
            if outcome.kind == "done":
                self._remember_done(delivery)
            self._log_task(delivery, outcome)
            return
        self._flush_acks()
        if outcome.kind == "retry":
            self._channel.basic_nack(delivery.tag, requeue=True)
        elif outcome.kind == "dead-letter":
            outcome = self._dead_letter(delivery, outcome)
        self._log_task(delivery, outcome)

    def _remember_done(self, delivery: _Delivery) -> None:
        message_id = delivery.properties.message_id
        if message_id:
            self._done_recently[message_id] = None
            while len(self._done_recently) > _REMEMBERED_DONE:
                self._done_recently.popitem(last=False)

    def _flush_acks(self) -> None:
        if self._ack_upto and self._channel is not None and self._channel.is_open:
            self._channel.basic_ack(self._ack_upto, multiple=True)
        self._ack_upto = 0
        self._acks_held = 0

    def _dead_letter(self, delivery: _Delivery, outcome: _Outcome) -> _Outcome:
        props = delivery.properties
        error = outcome.error
        headers = dict(props.headers or {})
        headers.update(
            {
                f"{HEADER_PREFIX}reason": outcome.reason,
                f"{HEADER_PREFIX}exception": type(error).__name__ if error else "",
                f"{HEADER_PREFIX}error": str(error)[:_ERROR_TEXT_LIMIT] if error else "",
                f"{HEADER_PREFIX}attempts": outcome.attempt,
                f"{HEADER_PREFIX}worker": self.config.worker_name,
                f"{HEADER_PREFIX}pipeline": self.config.pipeline,
                f"{HEADER_PREFIX}queue": self.config.queue,
                f"{HEADER_PREFIX}failed-at": int(time.time()),
            }
        )
        dead = pika.BasicProperties(
            content_type=props.content_type,
            content_encoding=props.content_encoding,
            headers=headers,
            delivery_mode=2,
            correlation_id=props.correlation_id,
            message_id=props.message_id,
            timestamp=props.timestamp,
            type=props.type,
            app_id=props.app_id,
        )
        try:
            self._dead_letter_channel.basic_publish(
                topology.DEAD_LETTER_EXCHANGE,
                self.config.queue,
                delivery.body,
                dead,
                mandatory=True,
            )
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
            # Not stored by the broker: keep the original instead of losing it.
            self._channel.basic_nack(delivery.tag, requeue=True)
            return outcome._replace(
                kind="retry", reason=f"dead-letter publish failed: {_describe(e)}"
            )
        self._channel.basic_ack(delivery.tag)
        return outcome

    def _log_task(self, delivery: _Delivery, outcome: _Outcome) -> None:
        extra: dict[str, str] = {}
        if outcome.reason:
            extra["reason"] = outcome.reason
        if outcome.error is not None:
            extra["error"] = f"{type(outcome.error).__name__}: {outcome.error}"[:300]
        self.log.defer(
            INFO if outcome.kind in ("done", "duplicate") else WARNING,
            "task",
            outcome=outcome.kind,
            queue=self.config.queue,
            message_id=delivery.properties.message_id,
            attempt=outcome.attempt,
            duration=f"{outcome.seconds:.3f}",
            **extra,
        )

    def _execute(self, delivery: _Delivery) -> _Outcome:
        props = delivery.properties
        started = time.monotonic()
        try:
            task = Task.decode(
                delivery.body,
                content_type=props.content_type,
                headers=props.headers,
                message_id=props.message_id,
                redelivered=delivery.redelivered,
                queue=self.config.queue,
            )
        except UndecodableBody as e:
            return _Outcome("dead-letter", 1, 0.0, "undecodable", e)
        if task.redelivered and task.message_id and task.message_id in self._done_recently:
            return _Outcome("duplicate", task.attempt, 0.0, "done before its ack was lost")
        if task.attempt > self.config.max_attempts:
            # Earlier deliveries ended without a verdict (crashes, lost connections).
            return _Outcome("dead-letter", task.attempt, 0.0, "attempts-exhausted")
        try:
            self.handler(task)
        except PermanentError as e:
            return _Outcome(
                "dead-letter", task.attempt, time.monotonic() - started, "permanent-error", e
            )
        except BaseException as e:
            seconds = time.monotonic() - started
            if task.attempt >= self.config.max_attempts:
                return _Outcome("dead-letter", task.attempt, seconds, "max-attempts", e)
            return _Outcome("retry", task.attempt, seconds, "handler-failed", e)
        return _Outcome("done", task.attempt, time.monotonic() - started)


def _closing_reason(channel: Any) -> str:
    # pika keeps the broker's Channel.Close reason only in a private attribute.
    reason = getattr(channel, "_closing_reason", None)
    return _describe(reason) if reason is not None else "closed"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:_ERROR_TEXT_LIMIT]


def run(handler: Handler, config: WorkerConfig, log: EventLog | None = None) -> int:
    """Consume `config.queue` with `handler` until a reason to stop; the exit code."""
    return Runner(handler, config, log or EventLog(config.log_format)).run()
