"""The consume loop: one handler, one task at a time, acked only after it succeeds.

Two threads. The consumer thread (consumer.py) connects, runs the tasks and acks them. The
main thread (here) receives the signals, writes the task log lines the consumer thread only
queued, keeps the connection alive while a handler runs and, past the shutdown grace, gives
up a task that is still running so that the broker requeues it. What they share, and the
lock that says which of them may touch the connection, is in handover.py.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

from jobtide_worker import priority
from jobtide_worker.config import BrokerTlsError, WorkerConfig
from jobtide_worker.consumer import BrokerRefused, BrokerUnreachable, Consumer, OpenConnection
from jobtide_worker.handover import Handover, State
from jobtide_worker.logs import ERROR, INFO, WARNING, EventLog
from jobtide_worker.outcome import Handler

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_HANDLER = 3
EXIT_BROKER = 4

HANDLER_PATH = "/app"
# How often the main thread writes task lines, looks at the clock and services the connection
# while a handler runs.
_KEEPALIVE_SECONDS = 0.2
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


def _consumer_priority(mode: str) -> int | None:
    """The worker's `x-priority`, from its start and, in `node` mode, its node's boot."""
    booted = priority.node_booted_unix_seconds() if mode == priority.NODE else None
    return priority.consumer_priority(mode, time.time(), booted)


class Runner:
    def __init__(
        self,
        handler: Handler,
        config: WorkerConfig,
        log: EventLog,
        open_connection: OpenConnection | None = None,
    ) -> None:
        """`open_connection` defaults to a pika.BlockingConnection to `config.broker`."""
        self.config = config
        self.log = log
        self.handover = Handover()
        self._started = time.monotonic()
        if open_connection is None:
            open_connection = functools.partial(
                config.broker.connect, f"jobtide-worker {config.worker_name}"
            )
        self._consumer = Consumer(
            handler,
            config,
            log,
            self.handover,
            open_connection,
            started=self._started,
            priority=_consumer_priority(config.consumer_priority),
        )

    def run(self) -> int:
        with self._signals_handled():
            return self._run()

    def _run(self) -> int:
        handover = self.handover
        self.log.event(INFO, "worker starting", **self.config.summary())
        handover.start(self._consumer.run)
        try:
            while not handover.wait(_KEEPALIVE_SECONDS):
                # The consumer thread defers its line per task: written here, off its path.
                self.log.flush()
                handover.wake_if_stopping()
                if self._running_task_overdue():
                    reason = (
                        State.SIGTERM if handover.sigterm_at is not None else State.MAX_LIFETIME
                    )
                    given_up = handover.abandon(self._consumer.close_connection)
                    if given_up is not None:
                        self._log_given_up(given_up)
                        return self._exit(EXIT_OK, reason)
                handover.service(self._consumer.keep_alive)
        except BaseException:
            # Stop the consumer thread as on SIGTERM, so none is left consuming behind a
            # library caller that gets this exception.
            handover.terminate()
            handover.wake_if_stopping()
            raise
        finally:
            self.log.flush()
        try:
            reason = handover.result()
        except BrokerUnreachable:
            return EXIT_BROKER
        except BrokerTlsError as e:
            # Configuration, not an outage: retrying for JOBTIDE_RECONNECT_SECONDS would
            # only hide it behind "broker unreachable".
            self.log.event(ERROR, "broker TLS failed", problem=str(e))
            return EXIT_CONFIG
        except BrokerRefused:  # logged where the broker said it, naming the variable
            return EXIT_CONFIG
        return self._exit(EXIT_OK, reason)

    def _running_task_overdue(self) -> bool:
        if self.handover.in_flight is None:
            return False
        now = time.monotonic()
        sigterm_at = self.handover.sigterm_at
        if sigterm_at is not None and now - sigterm_at > self.config.shutdown_grace_seconds:
            return True
        lifetime = self.config.max_lifetime_seconds
        return bool(lifetime) and now - self._started > lifetime + self.config.max_task_seconds

    def _log_given_up(self, running: Any) -> None:
        self.log.event(
            WARNING,
            "task still running at shutdown; requeued",
            message_id=running.properties.message_id,
            grace_seconds=self.config.shutdown_grace_seconds
            if self.handover.sigterm_at is not None
            else self.config.max_task_seconds,
        )

    @contextlib.contextmanager
    def _signals_handled(self) -> Iterator[None]:
        """SIGTERM and SIGINT stop the worker while it runs; the program's own handlers are
        back afterwards (run() is also a library call). Only the main thread may set them."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, _frame: types.FrameType | None) -> None:
            self.handover.terminate()

        previous = {signum: signal.signal(signum, stop) for signum in _STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(signum, handler)

    def _exit(self, code: int, reason: State) -> int:
        self.log.event(
            INFO,
            "worker exiting",
            reason=reason.value,
            exit_code=code,
            tasks=self._consumer.finished,
            seconds=round(time.monotonic() - self._started, 1),
        )
        return code


def run(handler: Handler, config: WorkerConfig, log: EventLog | None = None) -> int:
    """Consume `config.queue` with `handler` until a reason to stop; the exit code."""
    return Runner(handler, config, log or EventLog(config.log_format)).run()
