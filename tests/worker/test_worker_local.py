"""`run_local` and `python -m jobtide_worker run-local`: a handler run on tasks without a broker,
with the worker's own decisions and log lines. test_worker_local_parity.py runs the same tasks
through the real worker on the real broker and compares."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import handlers
import pytest
from jobtide_worker import Task, run_local
from jobtide_worker.logs import EventLog
from jobtide_worker.pipeline_settings import SettingsError
from jobtide_worker.task import ACQUIRED_COUNT_HEADER

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
README = REPO / "images" / "worker" / "README.md"

FLAKY = {"id": "flaky", "fail_until_attempt": 2}
POISON = {"id": "poison", "always_fail": True}
HOPELESS = {"id": "hopeless", "permanent": True}

# The same handler in process and, for the command, as a module on its PYTHONPATH.
handle = handlers.fail_as_told
HANDLERS = Path(handlers.__file__).parent


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_task_is_retried_up_to_max_attempts_then_dead_lettered() -> None:
    stream = io.StringIO()
    result = run_local(
        handle,
        [{"id": "fine"}, FLAKY, POISON, HOPELESS],
        queue="resize",
        max_attempts=3,
        log=EventLog("json", stream),
    )
    assert result.final == ["done", "done", "dead-letter", "dead-letter"]
    assert not result.ok
    deliveries = [
        (a.task.json["id"] if a.task else None, a.task.attempt if a.task else 0, a.outcome.kind)
        for a in result.attempts
    ]
    # A task to retry goes back ahead of those waiting, as in a RabbitMQ 4.3 quorum queue.
    assert deliveries == [
        ("fine", 1, "done"),
        ("flaky", 1, "retry"),
        ("flaky", 2, "done"),
        ("poison", 1, "retry"),
        ("poison", 2, "retry"),
        ("poison", 3, "dead-letter"),
        ("hopeless", 1, "dead-letter"),
    ]
    task_lines = [e for e in json_lines(stream) if e["message"] == "task"]
    assert [(e["outcome"], e["attempt"], e.get("reason")) for e in task_lines] == [
        ("done", 1, None),
        ("retry", 1, "handler-failed"),
        ("done", 2, None),
        ("retry", 1, "handler-failed"),
        ("retry", 2, "handler-failed"),
        ("dead-letter", 3, "max-attempts"),
        ("dead-letter", 1, "permanent-error"),
    ]
    assert task_lines[5]["error"] == "ValueError: boom poison"
    assert {e["queue"] for e in task_lines} == {"resize"}
    summary = json_lines(stream)[-1]
    assert summary["message"] == "run-local finished"
    assert (summary["done"], summary["dead_lettered"], summary["deliveries"]) == (2, 2, 7)


def test_the_handler_gets_the_task_the_worker_would_get() -> None:
    result = run_local(handle, [FLAKY], max_attempts=2, log=EventLog(stream=io.StringIO()))
    first, second = (a.task for a in result.attempts)
    assert first is not None
    assert second is not None
    assert first.json == FLAKY
    assert first.content_type == "application/json"
    assert (first.attempt, first.redelivered, dict(first.headers)) == (1, False, {})
    # The redelivery: the same message, counted by the queue's acquired-count header.
    assert first.message_id
    assert second.message_id == first.message_id
    assert (second.attempt, second.redelivered) == (2, True)
    assert second.headers[ACQUIRED_COUNT_HEADER] == 1
    assert second.queue == "local"


def test_bytes_go_as_they_are_like_publish_sends_them() -> None:
    received: list[Task] = []
    result = run_local(received.append, [b"\x00raw"], log=EventLog(stream=io.StringIO()))
    assert result.ok
    [raw] = received
    assert (raw.body, raw.json, raw.content_type) == (b"\x00raw", None, "application/octet-stream")


def test_dead_letters_carry_the_workers_headers() -> None:
    result = run_local(
        handle, [POISON, HOPELESS], queue="q", max_attempts=2, log=EventLog(stream=io.StringIO())
    )
    poison, hopeless = result.dead_letters  # in the order they were dead-lettered
    assert poison.task == POISON
    assert json.loads(poison.body) == POISON
    assert poison.reason == "max-attempts"
    assert poison.headers["x-jobtide-exception"] == "ValueError"
    assert poison.headers["x-jobtide-error"] == "boom poison"
    assert poison.headers["x-jobtide-attempts"] == 2
    assert poison.headers["x-jobtide-queue"] == "q"
    assert poison.headers[ACQUIRED_COUNT_HEADER] == 1  # kept from the last delivery
    assert hopeless.reason == "permanent-error"
    assert hopeless.headers["x-jobtide-attempts"] == 1


def test_max_attempts_has_the_pipeline_settings_bounds() -> None:
    with pytest.raises(SettingsError, match="maxAttempts"):
        run_local(handle, [], max_attempts=0)


def test_a_handler_raising_anything_is_retried_like_in_the_worker() -> None:
    calls: list[int] = []

    def leaves(task: Task) -> None:
        calls.append(task.attempt)
        if task.attempt == 1:
            raise SystemExit(1)  # as in the worker: caught, the task is retried

    result = run_local(leaves, [{}], log=EventLog(stream=io.StringIO()))
    assert calls == [1, 2]
    assert result.ok


def run_cli(cwd: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobtide_worker", "run-local", *args],
        input=stdin,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(HANDLERS)},
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_the_command_reads_stdin_or_a_file_and_prints_the_dead_letters(tmp_path: Path) -> None:
    lines = "".join(json.dumps(t) + "\n" for t in ({"id": 1}, FLAKY, POISON)) + "\n"

    done = run_cli(tmp_path, "--handler", "handlers:fail_as_told", stdin=json.dumps({"id": 1}))
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
    assert re.search(r"INFO task outcome=done queue=local message_id=\w+ attempt=1 ", done.stderr)

    (tmp_path / "tasks.jsonl").write_text(lines)
    failed = run_cli(
        tmp_path,
        "--handler",
        "handlers:fail_as_told",
        "--max-attempts",
        "2",
        "--log-format",
        "json",
        "tasks.jsonl",
    )
    assert failed.returncode == 1, failed.stderr
    [dead] = [json.loads(line) for line in failed.stdout.splitlines()]
    assert dead["task"] == POISON
    assert dead["headers"]["x-jobtide-reason"] == "max-attempts"
    assert dead["headers"]["x-jobtide-attempts"] == 2
    outcomes = [json.loads(line) for line in failed.stderr.splitlines()]
    assert [e["outcome"] for e in outcomes if e["message"] == "task"] == [
        "done",
        "retry",
        "done",
        "retry",
        "dead-letter",
    ]


def test_the_command_refuses_bad_input_and_missing_handlers(tmp_path: Path) -> None:
    not_json = run_cli(tmp_path, "--handler", "handlers:fail_as_told", stdin='{"id": 1}\n{oops\n')
    assert not_json.returncode == 2
    assert "line 2: not JSON" in not_json.stderr
    bound = run_cli(tmp_path, "--handler", "handlers:fail_as_told", "--max-attempts", "0")
    assert bound.returncode == 2
    assert "maxAttempts" in bound.stderr
    missing = run_cli(tmp_path, "--handler", "handlers:nothing", stdin="{}\n")
    assert missing.returncode == 3
    assert "handler could not be loaded" in missing.stderr


def python_block(text: str, first_line: str) -> str:
    """The README's ```python block that starts with `first_line`."""
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        if block.startswith(first_line):
            return str(block)
    raise AssertionError(f"no python block starting with {first_line!r} in {README}")


def test_the_readmes_example_test_passes_on_the_readmes_handler(tmp_path: Path) -> None:
    text = README.read_text()
    (tmp_path / "handler.py").write_text(python_block(text, "# handler.py"))
    (tmp_path / "test_handler.py").write_text(python_block(text, "# test_handler.py"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_handler.py"],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
