"""The worker's two threads and everything they share, in one place.

pika connections are not thread-safe, so one lock says which thread may touch the connection.
The consumer thread holds it for its whole life except while the user's handler runs: it
connects, reads deliveries, runs each task, acks and reconnects. At prefetch 1 a task thus
costs no hand-off between threads, which is what lets the runner keep up with a bare pika
consumer. While a handler runs, the main thread takes the lock a few times a second to service
the connection (`service`: heartbeats, a channel closed by the broker, deliveries that are only
queued), so a task of an hour never starves the heartbeats; an error it meets there is handed
to the consumer thread, which raises it once the task is over. Past the shutdown grace the
main thread closes the connection under a task still running (`abandon`), so that the broker
requeues it; when that handler returns, its thread ends without touching the connection again.

One state value says whether and why the worker stops. Its writers never race in a way that
loses a SIGTERM: the consumer thread moves RUNNING to a limit (idle, queue-silent, max-tasks,
max-lifetime)
holding the lock; the signal handler, in the main thread, stores `sigterm_at` first and then
SIGTERM, which overrides a limit; the main thread moves to ABANDONED holding the lock. Only the
consumer's check-then-store can interleave with the signal handler, and it looks at
`sigterm_at` again after its store. The signal handler takes no lock: a lock taken in a signal
handler deadlocks when the interrupted main thread holds it.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from typing import Any


class State(enum.Enum):
    """Whether the worker stops, and why; the value is the reason its exit line gives."""

    RUNNING = "running"
    IDLE = "idle"
    QUEUE_SILENT = "queue-silent"  # idle, and the queue's counters say nothing more is coming
    MAX_TASKS = "max-tasks"
    MAX_LIFETIME = "max-lifetime"
    SIGTERM = "sigterm"
    # The main thread closed the connection under a running task: its thread must end.
    ABANDONED = "abandoned"


LIMITS = (State.IDLE, State.QUEUE_SILENT, State.MAX_TASKS, State.MAX_LIFETIME)


class Abandoned(Exception):
    """Raised in the consumer thread when the task it ran was given up meanwhile."""


class Handover:
    def __init__(self) -> None:
        # Whoever holds it may touch the connection and its channels.
        self._lock = threading.Lock()
        # Cuts the consumer thread's reconnect back-off short once the worker stops.
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: State | BaseException | None = None
        self.state = State.RUNNING
        self.sigterm_at: float | None = None
        # The delivery whose handler runs now, without the lock; None between tasks.
        self.in_flight: Any = None
        # Met by the main thread while servicing the connection during a task.
        self._connection_error: BaseException | None = None

    # -- the consumer thread's life, started and awaited by the main thread --------------
    def start(self, consume: Callable[[], State]) -> None:
        """Run `consume` on the consumer thread, holding the lock; it returns why it stopped."""

        def consumer_main() -> None:
            try:
                with self._lock:
                    self._result = consume()
            except Abandoned:
                self._result = State.ABANDONED
            except BaseException as e:
                self._result = e

        self._thread = threading.Thread(target=consumer_main, name="consumer", daemon=True)
        self._thread.start()

    def wait(self, seconds: float) -> bool:
        """Up to `seconds` for the consumer thread to end; True once it has."""
        assert self._thread is not None, "start() first"
        self._thread.join(seconds)
        return not self._thread.is_alive()

    def result(self) -> State:
        """Why the consumer thread stopped; what it raised is raised here."""
        result = self._result
        if isinstance(result, BaseException):
            raise result
        assert result is not None, "the consumer thread ended without a result"
        return result

    # -- the consumer thread -----------------------------------------------------------
    def run_task(self, delivery: Any, execute: Callable[[Any], Any]) -> Any:
        """`execute(delivery)` without the lock, so the main thread can service the
        connection meanwhile; its result once the lock is back."""
        self.in_flight = delivery
        self._lock.release()
        try:
            return execute(delivery)
        finally:
            self._lock.acquire()
            self.in_flight = None
            if self.state is State.ABANDONED:
                raise Abandoned

    def stopping(self) -> State | None:
        """Why the worker stops, None while it runs. A call, not the attribute, where the
        state is read again after a wait: it changes behind the type checker's back."""
        state = self.state
        return None if state is State.RUNNING else state

    def take_connection_error(self) -> BaseException | None:
        error, self._connection_error = self._connection_error, None
        return error

    def connection_failed(self) -> bool:
        return self._connection_error is not None

    def stop(self, limit: State) -> None:
        """A limit reached: stop, unless already stopping for another reason."""
        assert limit in LIMITS, limit
        if self.state is State.RUNNING:
            self.state = limit
            if self.sigterm_at is not None:  # the signal came between the check and the store
                self.state = State.SIGTERM

    def pause(self, seconds: float) -> None:
        """Sleep up to `seconds`, less when the worker stops meanwhile."""
        self._wake.wait(seconds)

    # -- the main thread -----------------------------------------------------------------
    def terminate(self) -> None:
        """SIGTERM or SIGINT: called from the signal handler, so it takes no lock."""
        if self.sigterm_at is None:
            self.sigterm_at = time.monotonic()
        if self.state is not State.ABANDONED:
            self.state = State.SIGTERM

    def wake_if_stopping(self) -> None:
        if self.state is not State.RUNNING:
            self._wake.set()

    def service(self, keep_alive: Callable[[], None]) -> None:
        """Run `keep_alive` on the connection while a handler runs and the consumer thread
        leaves it alone; an error it raises waits for the consumer thread."""
        if self.in_flight is None or not self._lock.acquire(blocking=False):
            return
        try:
            if self.in_flight is not None and self._connection_error is None:
                keep_alive()
        except Exception as e:
            self._connection_error = e
        finally:
            self._lock.release()

    def abandon(self, close: Callable[[], None]) -> Any:
        """Take the connection from under the running task and `close` it, so the broker
        requeues the task; the delivery given up, or None when it ended meanwhile."""
        with self._lock:
            running = self.in_flight
            if running is None:
                return None
            self.state = State.ABANDONED
            self._wake.set()
            close()
        return running
