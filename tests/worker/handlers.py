"""Handlers the worker tests run inside real worker processes (JOBTIDE_HANDLER=handlers:NAME).

Each task is a JSON object with an `id`; `handle` records what happened to it as JSON lines
in the file named by JOBTIDE_TEST_RECORD, so a test can tell which process did what."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from jobtide_worker import PermanentError, Task


def _record(event: str, task: Task, **extra: Any) -> None:
    _write(
        {
            "event": event,
            "id": task.json.get("id"),
            "attempt": task.attempt,
            "pid": os.getpid(),
            "redelivered": task.redelivered,
            **extra,
        }
    )


def _write(record: dict[str, Any]) -> None:
    line = json.dumps(record)
    # One write of a whole line with O_APPEND: lines of concurrent workers never interleave.
    fd = os.open(os.environ["JOBTIDE_TEST_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def handle(task: Task) -> None:
    _record("start", task)
    time.sleep(float(task.json.get("seconds", 0)))
    fail_as_told(task)
    _record("done", task)


def fail_as_told(task: Task) -> None:
    """Fails as the task says (`permanent`, `always_fail`, `fail_until_attempt`), records
    nothing: for run-local, in process or as its --handler."""
    spec = task.json
    if spec.get("permanent"):
        raise PermanentError(f"task {spec['id']} can never work")
    if spec.get("always_fail"):
        raise ValueError(f"boom {spec['id']}")
    if task.attempt < int(spec.get("fail_until_attempt", 0)):
        raise RuntimeError(f"transient failure on attempt {task.attempt}")


def trivial(task: Task) -> None:
    """For the throughput benchmark: the runner's own cost only."""


def hostile(task: Task) -> None:
    """For the hostile-message tests: records every delivery by its `x-test-name` header with
    the properties the handler got, fails while `x-test-fail-until` says so, and touches the
    parsed body and every header (a handler may)."""
    name = task.headers.get("x-test-name")
    repr(task.json)
    repr(dict(task.headers))
    fields = {
        "content_type": task.content_type,
        "content_encoding": task.content_encoding,
        "correlation_id": task.correlation_id,
        "reply_to": task.reply_to,
        "message_id": task.message_id,
        "timestamp": task.timestamp,
        "type": task.type,
        "app_id": task.app_id,
        "size": len(task.body),
        "probe": repr(task.headers.get("x-test-probe")),
    }
    _write({"event": "run", "name": name, "attempt": task.attempt, "pid": os.getpid(), **fields})
    if task.attempt < int(task.headers.get("x-test-fail-until", 0)):
        raise RuntimeError(f"{name} fails on attempt {task.attempt}")
