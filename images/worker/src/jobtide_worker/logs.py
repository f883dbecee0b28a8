"""The worker's own log lines: one line per event, plain text or JSON (JOBTIDE_LOG_FORMAT).

Lines are formatted and written here rather than through the logging module: a busy worker
writes a line per task, and a LogRecord and its handler chain cost more than the rest of the
runner's own work on a task (measured for a task's line: logging.info 12.5 us; `event` 5.5 us;
`defer` 1.1 us on the task's thread, then 3.2 us on the writing thread).
The user's handler may still use logging as it likes; its lines go to logging's own handlers.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import sys
import threading
import time
from typing import Any, TextIO

INFO, WARNING, ERROR = logging.INFO, logging.WARNING, logging.ERROR

# One regex search instead of a per-character loop: this runs for every field of every task's
# log line.
_NEEDS_QUOTES = re.compile(r'[\s"=]')

# When, level, message, fields.
_Entry = tuple[float, int, str, dict[str, Any]]


class EventLog:
    """Writes events as whole lines, from any thread; each thread's lines in their order.

    `event` writes its line at once. `defer` only queues it, for the next `flush` or `event`:
    the runner defers its line per task, so that the thread running tasks spends a fraction
    of a microsecond on it, and its main thread formats and writes the queued lines a few
    times a second while the task thread waits for the broker (as logging's QueueHandler
    moves the work off a thread that must respond quickly). Each line keeps the time of its
    event.

    Text: `2026-01-02 03:04:05,678 INFO task outcome=done attempt=1` (local time, as logging's
    default format), values quoted only when they would break key=value parsing.
    JSON: `{"time": "2026-01-02T03:04:05.678Z", "level": "info", "message": "task", ...}`."""

    def __init__(self, log_format: str = "text", stream: TextIO | None = None) -> None:
        if log_format not in ("text", "json"):
            raise ValueError(f"log format must be text or json, not {log_format!r}")
        self._json = log_format == "json"
        self._stream = sys.stderr if stream is None else stream
        # Held while writing, so lines from two threads neither interleave nor swap places.
        self._lock = threading.Lock()
        self._deferred: collections.deque[_Entry] = collections.deque()
        # The date and time down to the second, made once a second instead of once a line.
        self._second = -1
        self._second_text = ""

    def event(self, level: int, message: str, **fields: Any) -> None:
        entry = (time.time(), level, message, fields)
        with self._lock:
            self._write_locked(entry)

    def defer(self, level: int, message: str, **fields: Any) -> None:
        self._deferred.append((time.time(), level, message, fields))

    def flush(self) -> None:
        """Write the deferred lines."""
        if self._deferred:
            with self._lock:
                self._write_locked(None)

    def _write_locked(self, entry: _Entry | None) -> None:
        lines = []
        deferred = self._deferred
        while deferred:
            lines.append(self._format(*deferred.popleft()))
        if entry is not None:
            lines.append(self._format(*entry))
        self._stream.write("".join(lines))
        self._stream.flush()

    def _format(self, at: float, level: int, message: str, fields: dict[str, Any]) -> str:
        second = int(at)
        if second != self._second:
            self._second = second
            self._second_text = (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                if self._json
                else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            )
        millis = int((at - second) * 1000)
        level_name = logging.getLevelName(level)
        if self._json:
            entry: dict[str, Any] = {
                "time": f"{self._second_text}.{millis:03d}Z",
                "level": level_name.lower(),
                "message": message,
            }
            entry.update(fields)
            return json.dumps(entry, default=str) + "\n"
        parts = [f"{self._second_text},{millis:03d} {level_name} {message}"]
        for key, value in fields.items():
            text = value if type(value) is str else str(value)
            if not text or _NEEDS_QUOTES.search(text):
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        return " ".join(parts) + "\n"
