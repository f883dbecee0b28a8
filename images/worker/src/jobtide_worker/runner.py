"""The consume loop: one handler, one task at a time, acked only after it succeeds.

Threads: the main thread owns the pika connection (consumer callbacks, acks, publishes,
heartbeats); one handler thread runs tasks in delivery order and puts each result on a queue.
While a task runs, the main thread waits on that queue in short slices and services the
connection between them, so a task of an hour never starves the heartbeats, and a quick task's
result is acked without a trip through the connection's wake-up pipe.

Every delivery belongs to a channel generation. When a channel or connection is lost, the
broker requeues its unacked deliveries, so results of an older generation are never acked on
a newer channel: they are logged as `ack-lost` and the handler remembers their message ids, so
the redelivery of a task it already did is acked without running it again (on this worker;
another worker may run it again: handlers must be idempotent, as with any at-least-once queue).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import logging
import queue as queue_module
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]

from jobtide_worker import topology
from jobtide_worker.config import BrokerConfig, WorkerConfig
from jobtide_worker.logs import event
from jobtide_worker.task import PermanentError, Task, UndecodableBody

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_HANDLER = 3
EXIT_BROKER = 4

HEADER_PREFIX = "x-jobtide-"
HANDLER_PATH = "/app"
_ERROR_TEXT_LIMIT = 1000
_REMEMBERED_DONE = 1000
_TICK_SECONDS = 0.5
# How long the main thread waits for a running task's result before servicing the connection.
_RESULT_WAIT_SECONDS = 0.2
_BACKOFF_FIRST_SECONDS = 0.5
_BACKOFF_CAP_SECONDS = 8.0

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


def connection_parameters(broker: BrokerConfig, name: str) -> pika.ConnectionParameters:
    ssl_options = None
    if broker.tls:
        import ssl

        ssl_options = pika.SSLOptions(ssl.create_default_context(), broker.host)
    return pika.ConnectionParameters(
        host=broker.host,
        port=broker.port,
        virtual_host=broker.vhost,
        credentials=pika.PlainCredentials(broker.username, broker.password),
        heartbeat=broker.heartbeat_seconds,
        blocked_connection_timeout=300,
        ssl_options=ssl_options,
        connection_attempts=1,
        socket_timeout=10,
        client_properties={"connection_name": name},
    )


@dataclasses.dataclass(frozen=True)
class _Delivery:
    generation: int
    tag: int
    body: bytes
    properties: Any
    redelivered: bool


@dataclasses.dataclass(frozen=True)
class _Outcome:
    kind: str  # done | duplicate | retry | dead-letter | skipped
    attempt: int = 0
    seconds: float = 0.0
    reason: str = ""
    error: BaseException | None = None


class _ChannelLost(Exception):
    pass


class Runner:
    def __init__(self, handler: Handler, config: WorkerConfig, logger: logging.Logger) -> None:
        self.handler = handler
        self.config = config
        self.log = logger
        self._inbox: queue_module.SimpleQueue[_Delivery | None] = queue_module.SimpleQueue()
        self._results: queue_module.SimpleQueue[tuple[_Delivery, _Outcome]] = (
            queue_module.SimpleQueue()
        )
        self._generation = 0
        self._connection: Any = None
        self._channel: Any = None
        self._dead_letter_channel: Any = None
        self._consumer_tag: str | None = None
        self._unsettled = 0  # received on the current channel, not yet acked or nacked
        self._ack_upto = 0  # acks are batched: all tags up to this one succeeded
        # Log lines of the successes in the batch, written after its ack has been sent.
        self._unlogged: list[tuple[_Delivery, _Outcome]] = []
        self._in_flight: _Delivery | None = None
        self._done_recently: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._received = 0
        self._finished = 0
        self._last_activity = time.monotonic()
        self._started = time.monotonic()
        self._stop_reason: str | None = None
        self._starting_tasks = True  # cleared when no further task may start (SIGTERM)
        self._lock = threading.Lock()

    # -- the main thread ----------------------------------------------------------------
    def run(self) -> int:
        thread = threading.Thread(target=self._handler_loop, name="handler", daemon=True)
        thread.start()
        self._install_signals()
        event(self.log, logging.INFO, "worker starting", **self.config.summary())
        try:
            return self._run_connected()
        finally:
            self._inbox.put(None)

    def _run_connected(self) -> int:
        lost_since: float | None = None
        backoff = _BACKOFF_FIRST_SECONDS
        while True:
            if self._stop_reason is not None:
                return self._exit(EXIT_OK, self._stop_reason)
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
                    event(
                        self.log,
                        logging.ERROR,
                        "broker unreachable, giving up",
                        seconds=round(now - lost_since, 1),
                        error=_describe(e),
                    )
                    return EXIT_BROKER
                event(
                    self.log,
                    logging.WARNING,
                    "broker unreachable, retrying",
                    retry_in=round(min(backoff, remaining), 1),
                    error=_describe(e),
                )
                time.sleep(min(backoff, remaining))
                backoff = min(backoff * 2, _BACKOFF_CAP_SECONDS)
                continue
            lost_since, backoff = None, _BACKOFF_FIRST_SECONDS
            try:
                reason = self._consume()
            except _ChannelLost as e:
                event(
                    self.log,
                    logging.WARNING,
                    "channel closed by the broker; reopening",
                    error=str(e),
                )
                self._close_quietly()
                self._await_running_task()
                continue
            except _CONNECTION_LOST as e:
                event(self.log, logging.WARNING, "connection lost", error=_describe(e))
                self._lose_generation()
                self._await_running_task()
                lost_since = time.monotonic()
                continue
            self._close_quietly()
            return self._exit(EXIT_OK, reason)

    def _await_running_task(self) -> None:
        """Consume again only when the handler is free: its task's delivery was requeued, and
        a redelivery taken now would sit unacked behind it (another consumer timeout, another
        count towards the delivery limit). Its result is logged as ack-lost and remembered."""
        if self._in_flight is None:
            return
        event(self.log, logging.INFO, "waiting for the running task before consuming again")
        deadline: float | None = None
        while self._task_running():
            if self._requested_stop() is not None and deadline is None:
                deadline = time.monotonic() + self.config.shutdown_grace_seconds
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(0.1)
        self._settle_ready_results()

    # Both change behind mypy's back (signal handler, handler thread): never narrow them.
    def _requested_stop(self) -> str | None:
        return self._stop_reason

    def _task_running(self) -> bool:
        return self._in_flight is not None

    def _exit(self, code: int, reason: str) -> int:
        event(
            self.log,
            logging.INFO,
            "worker exiting",
            reason=reason,
            exit_code=code,
            tasks=self._finished,
            seconds=round(time.monotonic() - self._started, 1),
        )
        return code

    def _connect(self) -> None:
        params = connection_parameters(
            self.config.broker, f"jobtide-worker {self.config.worker_name}"
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
            with self._lock:
                self._generation += 1
                self._connection = connection
                self._channel = channel
                self._dead_letter_channel = dead_letter_channel
                self._unsettled = 0
                self._ack_upto = 0
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
        event(
            self.log,
            logging.INFO,
            "consuming",
            queue=self.config.queue,
            prefetch=self.config.prefetch,
        )

    def _consume(self) -> str:
        """Process events until a reason to stop; raise when the channel or connection is
        lost."""
        while True:
            self._pump(self._tick())
            if self._channel.is_closed:
                raise _ChannelLost(_closing_reason(self._channel))
            reason = self._stop_reason or self._limit_reached()
            if reason is not None:
                self._stop_reason = reason
                return self._drain(reason)

    def _pump(self, max_wait: float) -> None:
        """Wait up to `max_wait` for a task result or a broker event and handle what came.

        At prefetch 1 every task is a round trip (delivery, hand-off to the handler thread,
        result, ack, next delivery), so this path does as little as it can between a result
        and its ack and no connection poll that cannot find anything."""
        if self._unsettled > 0 or self._in_flight is not None:
            try:
                result = self._results.get(timeout=min(max_wait, _RESULT_WAIT_SECONDS))
            except queue_module.Empty:
                # A task still running: service heartbeats and further deliveries.
                self._connection.process_data_events(time_limit=0)
            else:
                self._settle(*result)
                self._settle_ready_results()
                self._flush_acks()  # before the next read: the broker sends the next task sooner
                if self._unsettled > 0:
                    # More deliveries are held or on their way: read them without waiting.
                    # With none held, the next call blocks in the read instead.
                    self._connection.process_data_events(time_limit=0)
        else:
            self._connection.process_data_events(time_limit=max_wait)
        self._settle_ready_results()
        self._flush_acks()

    def _settle_ready_results(self) -> None:
        while True:
            try:
                delivery, outcome = self._results.get_nowait()
            except queue_module.Empty:
                return
            self._settle(delivery, outcome)

    def _tick(self) -> float:
        if self._unsettled:
            return _TICK_SECONDS
        idle_left = self.config.idle_timeout_seconds - (time.monotonic() - self._last_activity)
        return max(0.0, min(_TICK_SECONDS, idle_left))

    def _limit_reached(self) -> str | None:
        cfg = self.config
        now = time.monotonic()
        if cfg.max_tasks and self._received >= cfg.max_tasks:
            return "max-tasks"
        if cfg.max_lifetime_seconds and now - self._started >= cfg.max_lifetime_seconds:
            return "max-lifetime"
        if self._unsettled == 0 and now - self._last_activity >= cfg.idle_timeout_seconds:
            return "idle"
        return None

    def _drain(self, reason: str) -> str:
        """Stop taking messages, let the running task finish (within the grace for SIGTERM),
        and leave the rest unacked: closing the connection requeues them."""
        with contextlib.suppress(*_CONNECTION_LOST, pika.exceptions.AMQPChannelError):
            if self._consumer_tag is not None:
                self._channel.basic_cancel(self._consumer_tag)
        if reason in ("sigterm", "max-lifetime"):
            # Prefetched tasks not started yet go back to the queue.
            self._starting_tasks = False
        else:
            # max-tasks: the tasks already taken (all within the limit) are done first.
            while self._unsettled > 0 and self._stop_reason != "sigterm":
                self._pump(0.1)
            self._starting_tasks = False
        grace = (
            self.config.shutdown_grace_seconds
            if self._stop_reason == "sigterm"
            else self.config.max_task_seconds
        )
        deadline = time.monotonic() + grace
        while self._in_flight is not None and time.monotonic() < deadline:
            self._pump(0.1)
        self._pump(0)
        running = self._in_flight
        if running is not None:
            event(
                self.log,
                logging.WARNING,
                "task still running at shutdown; requeued",
                message_id=running.properties.message_id,
                grace_seconds=grace,
            )
        return reason

    def _close_quietly(self) -> None:
        self._lose_generation()
        with contextlib.suppress(Exception):
            if self._connection is not None and self._connection.is_open:
                self._connection.close()

    def _lose_generation(self) -> None:
        """Deliveries of the current channel are void from now on (the broker requeues them)."""
        self._log_successes()  # their ack may be lost, but the tasks were done
        with self._lock:
            self._generation += 1
            self._unsettled = 0
            self._ack_upto = 0

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum: int, _frame: types.FrameType | None) -> None:
            self._stop_reason = "sigterm"

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        if self.config.max_tasks and self._received >= self.config.max_tasks:
            return  # beyond the limit: left unacked, the broker requeues it when we close
        self._unsettled += 1
        self._received += 1
        self._last_activity = time.monotonic()
        self._inbox.put(
            _Delivery(
                self._generation,
                method.delivery_tag,
                body,
                properties,
                bool(method.redelivered),
            )
        )

    def _settle(self, delivery: _Delivery, outcome: _Outcome) -> None:
        """Runs on the main thread for each finished delivery."""
        self._last_activity = time.monotonic()
        if outcome.kind == "skipped":
            return
        if delivery.generation != self._generation or self._channel.is_closed:
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
        self._unsettled -= 1
        if outcome.kind in ("done", "duplicate"):
            self._ack_upto = delivery.tag
            self._unlogged.append((delivery, outcome))
            return
        if outcome.kind == "retry":
            self._flush_acks()
            self._channel.basic_nack(delivery.tag, requeue=True)
        elif outcome.kind == "dead-letter":
            self._flush_acks()
            outcome = self._dead_letter(delivery, outcome)
        self._log_task(delivery, outcome)

    def _flush_acks(self) -> None:
        if self._ack_upto and self._channel is not None and self._channel.is_open:
            self._channel.basic_ack(self._ack_upto, multiple=True)
        self._ack_upto = 0
        self._log_successes()

    def _log_successes(self) -> None:
        # Logged after the ack so that formatting and writing the lines overlap the broker's
        # sending of the next task rather than delaying it.
        for delivery, outcome in self._unlogged:
            self._log_task(delivery, outcome)
        self._unlogged.clear()

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
            return dataclasses.replace(
                outcome, kind="retry", reason=f"dead-letter publish failed: {_describe(e)}"
            )
        self._channel.basic_ack(delivery.tag)
        return outcome

    def _log_task(self, delivery: _Delivery, outcome: _Outcome) -> None:
        level = logging.INFO if outcome.kind in ("done", "duplicate") else logging.WARNING
        if not self.log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "outcome": outcome.kind,
            "queue": self.config.queue,
            "message_id": delivery.properties.message_id,
            "attempt": outcome.attempt,
            "duration": f"{outcome.seconds:.3f}",
        }
        if outcome.reason:
            fields["reason"] = outcome.reason
        if outcome.error is not None:
            fields["error"] = f"{type(outcome.error).__name__}: {outcome.error}"[:300]
        event(self.log, level, "task", **fields)

    # -- the handler thread -------------------------------------------------------------
    def _handler_loop(self) -> None:
        while True:
            delivery = self._inbox.get()
            if delivery is None:
                return
            with self._lock:
                current = delivery.generation == self._generation
                if current and self._starting_tasks:
                    self._in_flight = delivery
            outcome = (
                self._execute(delivery) if self._in_flight is delivery else _Outcome("skipped")
            )
            # Queued before the task stops counting as in flight, so a main thread that sees
            # nothing in flight finds the result already waiting.
            self._results.put((delivery, outcome))
            self._in_flight = None

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
        if task.message_id:
            self._done_recently[task.message_id] = None
            while len(self._done_recently) > _REMEMBERED_DONE:
                self._done_recently.popitem(last=False)
        return _Outcome("done", task.attempt, time.monotonic() - started)


def _closing_reason(channel: Any) -> str:
    # pika keeps the broker's Channel.Close reason only in a private attribute.
    reason = getattr(channel, "_closing_reason", None)
    return _describe(reason) if reason is not None else "closed"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:_ERROR_TEXT_LIMIT]


def run(handler: Handler, config: WorkerConfig, logger: logging.Logger | None = None) -> int:
    """Consume `config.queue` with `handler` until a reason to stop; the exit code."""
    from jobtide_worker.logs import setup

    return Runner(handler, config, logger or setup(config.log_format)).run()
