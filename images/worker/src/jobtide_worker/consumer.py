"""The consumer thread's work: connect, read deliveries, run each task, ack, dead-letter and
reconnect, until a reason to stop. How it shares the connection with the main thread is in
handover.py.

Every delivery belongs to a channel generation. When a channel or connection is lost, the
broker requeues its unacked deliveries, so results of an older generation are never acked on
a newer channel: they are logged as `ack-lost` and their message ids remembered, so the
redelivery of a task already done is acked without running it again (on this worker; another
worker may run it again: handlers must be idempotent, as with any at-least-once queue). The
consumer never reconnects while a task runs: a redelivery taken then would sit unacked behind
it (another consumer timeout, another count towards the delivery limit).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable
from typing import Any, NoReturn

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
import requests

from jobtide_worker import fields, topology
from jobtide_worker.config import Variable, WorkerConfig
from jobtide_worker.handover import Handover, State
from jobtide_worker.logs import ERROR, INFO, WARNING, EventLog
from jobtide_worker.outcome import (
    DEAD_LETTER_PROPERTIES,
    HEADER_PREFIX,
    Delivery,
    Handler,
    Outcome,
    dead_letter_headers,
    describe,
    execute,
    log_task,
)
from jobtide_worker.quiet import (
    FIRST_READ_SECONDS,
    OddAnswer,
    QueueCounters,
    QueueWatch,
    queue_silent,
)
from jobtide_worker.task import ACQUIRED_COUNT_HEADER, count_header_of

_REMEMBERED_DONE = 1000
# Longest wait for the broker before the consumer thread looks at stop reasons and limits.
_TICK_SECONDS = 0.5
_BACKOFF_FIRST_SECONDS = 0.5
_BACKOFF_CAP_SECONDS = 8.0

CONNECTION_LOST = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionClosed,
    pika.exceptions.StreamLostError,
    ConnectionError,
    OSError,
)

# Opens a connection to the broker (pika.BlockingConnection or a test's fake).
OpenConnection = Callable[[], Any]


# The broker refused the user name or password.
_AUTHENTICATION_ERRORS = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.AuthenticationError,
)


class BrokerUnreachable(Exception):
    """The broker stayed away longer than the reconnect budget."""


class BrokerRefused(Exception):
    """The broker refused a setting of the worker (credentials, vhost, queue): retrying
    cannot help. `variable` is the setting to fix."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class _ChannelLost(Exception):
    pass


# AMQP reply codes (RabbitMQ's) that say a setting is wrong rather than the broker away.
_ACCESS_REFUSED = 403
_NOT_FOUND = 404
_PRECONDITION_FAILED = 406
_NOT_ALLOWED = 530


def refusal(error: BaseException, *, queue: str) -> BrokerRefused | None:
    """The setting `error` says is wrong, or None when the broker may just be away."""
    if isinstance(error, _AUTHENTICATION_ERRORS):
        return BrokerRefused(
            Variable.BROKER_USERNAME,
            f"the broker refused the user name or password ({describe(error)})",
        )
    code = _reply_code(error)
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError) or (
        isinstance(error, pika.exceptions.ConnectionClosedByBroker) and code == _NOT_ALLOWED
    ):
        return BrokerRefused(
            Variable.BROKER_VHOST,
            f"no such virtual host, or the user may not use it ({describe(error)})",
        )
    if isinstance(error, pika.exceptions.ChannelClosedByBroker):
        if code == _PRECONDITION_FAILED:
            return BrokerRefused(
                Variable.QUEUE,
                f"queue {queue!r} exists with other arguments than a jobtide pipeline's"
                f" (declared elsewhere?) ({describe(error)})",
            )
        if code == _NOT_FOUND:
            return BrokerRefused(
                Variable.QUEUE,
                f"queue {queue!r} does not exist and JOBTIDE_DECLARE_TOPOLOGY is false"
                f" ({describe(error)})",
            )
        if code == _ACCESS_REFUSED:
            return BrokerRefused(
                Variable.BROKER_USERNAME,
                f"the user may not use queue {queue!r} or the dead-letter exchange"
                f" ({describe(error)})",
            )
    return None


def _reply_code(error: BaseException) -> int | None:
    """The AMQP reply code of a close, also when pika wraps the close in another error."""
    for candidate in (error, *error.args):
        code = getattr(candidate, "reply_code", None)
        if isinstance(code, int):
            return code
    return None


class Consumer:
    def __init__(
        self,
        handler: Handler,
        config: WorkerConfig,
        log: EventLog,
        handover: Handover,
        open_connection: OpenConnection,
        *,
        started: float,
        priority: int | None,
    ) -> None:
        # Headers of any type, from any publisher, read and dead-lettered as they came.
        fields.install()
        self.handler = handler
        self.config = config
        self.log = log
        self.handover = handover
        self._open_connection = open_connection
        self._started = started
        self._consume_arguments: dict[str, int] = {
            "x-consumer-timeout": topology.consumer_timeout_ms(config.max_task_seconds)
        }
        if priority is not None:
            self._consume_arguments["x-priority"] = priority
        self._pending: collections.deque[Delivery] = collections.deque()
        self._generation = 0
        self._connection: Any = None
        self._channel: Any = None
        self._dead_letter_channel: Any = None
        self._consumer_tag: str | None = None
        self._connected_once = False
        self._tick_scheduled = False  # a wake-up timer is pending on the connection
        self._ack_upto = 0  # acks are batched: all tags up to this one succeeded
        self._ack_batch_limit = max(1, config.prefetch // 2)
        self._acks_held = 0  # successes not acked yet
        self._done_recently: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._received = 0
        # Where the connected broker counts deliveries; known once connected.
        self._count_header = ACQUIRED_COUNT_HEADER
        self.finished = 0
        self._last_activity = time.monotonic()
        # Leave when the queue is silent: the reads of the current idle spell (the one that
        # began at `_quiet_spell`), the last counters read in it and when to read next.
        self._watch = (
            QueueWatch(config.broker, config.queue) if config.quiet_check_seconds else None
        )
        self._quiet_spell = -1.0
        self._quiet_previous: QueueCounters | None = None
        self._quiet_next_read = 0.0
        self._quiet_problem_logged = False

    def run(self) -> State:
        """Consume until a reason to stop, reconnecting as needed; the reason."""
        handover = self.handover
        lost_since: float | None = None
        backoff = _BACKOFF_FIRST_SECONDS
        while True:
            stopping = handover.stopping()
            if stopping is not None:
                return stopping
            try:
                self._connect()
            except (*CONNECTION_LOST, pika.exceptions.ChannelClosedByBroker) as e:
                refused = refusal(e, queue=self.config.queue)
                rotating = refused is not None and self._password_may_be_rotating(e)
                if refused is not None and not rotating:
                    self._refused(refused, e)
                if not isinstance(e, CONNECTION_LOST):
                    raise
                now = time.monotonic()
                lost_since = now if lost_since is None else lost_since
                remaining = self.config.reconnect_seconds - (now - lost_since)
                stopping = handover.stopping()
                if stopping is not None:
                    return stopping
                if remaining <= 0:
                    if refused is not None:
                        self._refused(refused, e)
                    self.log.event(
                        ERROR,
                        "broker unreachable, giving up",
                        seconds=round(now - lost_since, 1),
                        error=describe(e),
                    )
                    raise BrokerUnreachable from e
                self.log.event(
                    WARNING,
                    "the broker refused the password, retrying with the credentials' files"
                    if rotating
                    else "broker unreachable, retrying",
                    retry_in=round(min(backoff, remaining), 1),
                    error=describe(e),
                )
                handover.pause(min(backoff, remaining))
                backoff = min(backoff * 2, _BACKOFF_CAP_SECONDS)
                continue
            lost_since, backoff = None, _BACKOFF_FIRST_SECONDS
            try:
                reason = self._consume()
            except _ChannelLost as e:
                self.log.event(WARNING, "channel closed by the broker; reopening", error=str(e))
                self.close_connection()
                continue
            except CONNECTION_LOST as e:
                self.log.event(WARNING, "connection lost", error=describe(e))
                self.close_connection()
                lost_since = time.monotonic()
                continue
            self.close_connection()
            if self._watch is not None:
                self._watch.close()
            return reason

    def _refused(self, refused: BrokerRefused, error: BaseException) -> NoReturn:
        self.log.event(
            ERROR,
            "the broker refused the configuration",
            variable=refused.variable,
            error=refused.problem,
        )
        raise refused from error

    def _password_may_be_rotating(self, error: BaseException) -> bool:
        """Whether a refused user name or password may be a rotation under way: credentials
        that worked before, read from files that kubelet rewrites once the Secret changes
        (the broker may have the new password first). Then the worker tries again, up to
        JOBTIDE_RECONNECT_SECONDS, reading the files at each attempt; a refusal at start
        stays a configuration error."""
        broker = self.config.broker
        return (
            self._connected_once
            and (broker.username_file or broker.password_file) is not None
            and isinstance(error, _AUTHENTICATION_ERRORS)
        )

    def keep_alive(self) -> None:
        """Called by the main thread, holding the lock, while a handler runs: heartbeats and
        a channel closed by the broker. Deliveries read here are only queued."""
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.process_data_events(time_limit=0)

    def close_connection(self) -> None:
        """Deliveries of the current channel are void from now on (the broker requeues them)."""
        self._generation += 1
        self._pending.clear()
        self._ack_upto = 0
        self._acks_held = 0
        with contextlib.suppress(Exception):
            if self._connection is not None and self._connection.is_open:
                self._connection.close()

    def _connect(self) -> None:
        connection = self._open_connection()
        try:
            if self.config.declare_topology:
                declaring = connection.channel()
                topology.declare(declaring, self.config.queue, self.config.broker.quorum_group_size)
                declaring.close()
            dead_letter_channel = connection.channel()
            dead_letter_channel.confirm_delivery()
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self.config.prefetch)
            self._generation += 1
            self._count_header = count_header_of(_server_version(connection))
            self._connection = connection
            self._connected_once = True
            self._channel = channel
            self._dead_letter_channel = dead_letter_channel
            self.handover.take_connection_error()  # about the connection just replaced
            self._tick_scheduled = False
            # Time spent reconnecting is not idleness: the queue may have filled meanwhile.
            self._last_activity = time.monotonic()
            self._consumer_tag = channel.basic_consume(
                self.config.queue, self._on_message, arguments=self._consume_arguments
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
            priority=self._consume_arguments.get("x-priority", "none"),
        )

    def _consume(self) -> State:
        """Run tasks until a reason to stop; raise when the channel or connection is lost.

        At prefetch 1 every task is a round trip (ack, next delivery), so the path from a
        handler's return to the next read does nothing that can wait: the task's log line is
        only queued, and written by the main thread."""
        handover = self.handover
        while True:
            self._check_connection()
            if handover.state is State.RUNNING:
                limit = self._limit_reached()
                if limit is not None:
                    handover.stop(limit)
            stopping = handover.stopping()
            if stopping is not None:
                return self._drain(stopping)
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

    def _tick(self) -> float:
        now = time.monotonic()
        wait = min(_TICK_SECONDS, self.config.idle_timeout_seconds - (now - self._last_activity))
        if self._watch is not None and not self._pending:
            # The first read of an idle spell on time: the spell's next tick is armed for it.
            first_read = self._last_activity + FIRST_READ_SECONDS
            if self._quiet_spell != self._last_activity and first_read > now:
                wait = min(wait, first_read - now)
            elif self._quiet_next_read > now:
                wait = min(wait, self._quiet_next_read - now)
        return max(0.0, wait)

    def _check_connection(self) -> None:
        error = self.handover.take_connection_error()
        if error is not None:
            raise error
        if self._channel.is_closed:
            raise _ChannelLost(_closing_reason(self._channel))

    def _run_task(self, delivery: Delivery) -> None:
        outcome = self.handover.run_task(delivery, self._execute)
        self._settle(delivery, outcome)

    def _execute(self, delivery: Delivery) -> Outcome:
        return execute(
            self.handler,
            delivery,
            queue=self.config.queue,
            max_attempts=self.config.max_attempts,
            done_recently=self._done_recently,
            count_header=self._count_header,
        )

    def _limit_reached(self) -> State | None:
        cfg = self.config
        now = time.monotonic()
        if cfg.max_tasks and self._received >= cfg.max_tasks:
            return State.MAX_TASKS
        if cfg.max_lifetime_seconds and now - self._started >= cfg.max_lifetime_seconds:
            return State.MAX_LIFETIME
        if not self._pending and now - self._last_activity >= cfg.idle_timeout_seconds:
            return State.IDLE
        if not self._pending and self._queue_fell_silent(now):
            return State.QUEUE_SILENT
        return None

    def _queue_fell_silent(self, now: float) -> bool:
        """While idle, every `quiet_check_seconds` (the first read shortly after the last
        message): whether nothing was published since the previous read of this idle spell and
        nothing is ready (jobtide_worker.quiet). A failed or odd read says no."""
        if self._watch is None:
            return False
        if self._quiet_spell != self._last_activity:  # a new idle spell: its reads start over
            self._quiet_spell = self._last_activity
            self._quiet_previous = None
            self._quiet_next_read = self._last_activity + FIRST_READ_SECONDS
        if now < self._quiet_next_read:
            return False
        try:
            current = self._watch.read()
        except (requests.RequestException, OddAnswer) as e:
            self._quiet_read_failed(e)
            return False
        finally:
            # Counted from the answer, so that the broker sees two reads at least the interval
            # apart, whatever each took: at least one statistics refresh lies between them.
            self._quiet_next_read = time.monotonic() + self.config.quiet_check_seconds
        silent = queue_silent(self._quiet_previous, current)
        self._quiet_previous = current
        if not silent:
            return False
        # A message may have reached the connection while the worker read: it is taken, and
        # the worker stays.
        self._connection.process_data_events(time_limit=0)
        return not self._pending

    def _quiet_read_failed(self, error: BaseException) -> None:
        if self._quiet_problem_logged or self._watch is None:
            return
        self._quiet_problem_logged = True
        self.log.event(
            WARNING,
            "queue counters unreadable; leaving by the idle timeout only",
            problem=self._watch.problem(error),
            idle_timeout_seconds=self.config.idle_timeout_seconds,
        )

    def _drain(self, reason: State) -> State:
        """Stop taking messages and leave the rest unacked: closing the connection requeues
        them. For max-tasks the tasks already taken (all within the limit) are done first,
        unless SIGTERM comes meanwhile."""
        with contextlib.suppress(*CONNECTION_LOST, pika.exceptions.AMQPChannelError):
            if self._consumer_tag is not None:
                self._channel.basic_cancel(self._consumer_tag)
        self._flush_acks()
        if reason is State.MAX_TASKS:
            while (
                self._pending
                and self.handover.state is State.MAX_TASKS
                and not self.handover.connection_failed()
                and self._channel.is_open
            ):
                self._run_task(self._pending.popleft())
            self._flush_acks()
        return reason

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        if self.config.max_tasks and self._received >= self.config.max_tasks:
            return  # beyond the limit: left unacked, the broker requeues it when we close
        self._received += 1
        self._last_activity = time.monotonic()
        self._pending.append(
            Delivery(
                self._generation,
                method.delivery_tag,
                body,
                properties,
                bool(method.redelivered),
            )
        )

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self._last_activity = time.monotonic()
        if (
            delivery.generation != self._generation
            or self.handover.connection_failed()
            or self._channel.is_closed
        ):
            if outcome.kind == "done":
                self._remember_done(delivery)
            self._log_task(
                delivery,
                Outcome(
                    "ack-lost",
                    outcome.attempt,
                    outcome.seconds,
                    f"channel gone before {outcome.kind}",
                ),
            )
            return
        self.finished += 1
        if outcome.kind in ("done", "duplicate"):
            self._ack_upto = delivery.tag
            self._acks_held += 1
            if self._acks_held >= self._ack_batch_limit and self.handover.state is State.RUNNING:
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

    def _remember_done(self, delivery: Delivery) -> None:
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

    def _dead_letter(self, delivery: Delivery, outcome: Outcome) -> Outcome:
        props = delivery.properties
        headers = dead_letter_headers(
            delivery,
            outcome,
            worker=self.config.worker_name,
            pipeline=self.config.pipeline,
            queue=self.config.queue,
        )
        dead = _dead_letter_properties(props, headers)
        if not self._fits_one_frame(dead):
            # The error text is the longest header added: the rest may fit without it.
            headers[f"{HEADER_PREFIX}error"] = ""
            dead = _dead_letter_properties(props, headers)
        if not self._fits_one_frame(dead):
            # A publisher's headers leave no room for the reason: a copy would be refused by
            # the broker (FRAME_ERROR closes the connection, the message comes back, again and
            # again). The queue's own dead-lettering moves it as it came, with x-death.
            self._channel.basic_reject(delivery.tag, requeue=False)
            return outcome._replace(
                reason=f"{outcome.reason}; no room for the reason headers: rejected to the"
                " queue's dead-letter exchange"
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
                kind="retry", reason=f"dead-letter publish failed: {describe(e)}"
            )
        self._channel.basic_ack(delivery.tag)
        return outcome

    def _fits_one_frame(self, properties: Any) -> bool:
        """Whether a message with `properties` can be sent at all: AMQP carries all of them in
        one content header frame, at most the connection's frame_max (negotiated at open)."""
        params = getattr(getattr(self._connection, "_impl", None), "params", None)
        frame_max = getattr(params, "frame_max", None)
        if not isinstance(frame_max, int):
            return True  # not a pika connection (a test's fake): nothing to measure
        size = _FRAME_OVERHEAD + _CONTENT_HEADER_FIXED + sum(map(len, properties.encode()))
        return size <= frame_max

    def _log_task(self, delivery: Delivery, outcome: Outcome) -> None:
        log_task(self.log, delivery, outcome, queue=self.config.queue)


# A frame's type, channel, size and end octet; a content header's class, weight and body size.
_FRAME_OVERHEAD = 8
_CONTENT_HEADER_FIXED = 12


def _dead_letter_properties(props: Any, headers: dict[str, Any]) -> Any:
    return pika.BasicProperties(
        headers=headers,
        delivery_mode=2,
        **{name: getattr(props, name) for name in DEAD_LETTER_PROPERTIES},
    )


def _server_version(connection: Any) -> object:
    """The version the broker announced (connection.start); pika keeps it on the connection's
    implementation only."""
    properties = getattr(getattr(connection, "_impl", None), "server_properties", None) or {}
    return properties.get("version")


def _closing_reason(channel: Any) -> str:
    # pika keeps the broker's Channel.Close reason only in a private attribute.
    reason = getattr(channel, "_closing_reason", None)
    return describe(reason) if reason is not None else "closed"
