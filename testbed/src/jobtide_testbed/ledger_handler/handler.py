"""The chaos run's handler (tests/e2e/test_chaos.py): it reports every attempt to the run's
ledger on the host (jobtide_testbed.ledger), outside the worker, so what a worker's crash
or restart loses cannot hide what was done. A task `{"id", "seconds", "poison"}` posts
`start`, sleeps its `seconds`, then posts `done`, or `poison` and dead-letters itself."""

import json
import os
import re
import socket
import time
import urllib.request

from jobtide_worker import PermanentError, Task

LEDGER_URL = os.environ["LEDGER_URL"]
POD = socket.gethostname()


def container_id() -> str:
    """This container's id, as containerd names its task: the 64 hex digits that end the
    process's cgroup path (cgroupfs and systemd drivers alike)."""
    with open("/proc/self/cgroup") as cgroups:
        found = re.findall(r"[0-9a-f]{64}", cgroups.read())
    return found[-1] if found else ""


CONTAINER = container_id()


def post(event: str, task: Task) -> None:
    """One line of the ledger; a failed post raises, so the attempt fails and is retried."""
    body = {
        "event": event,
        "task": task.json["id"],
        "queue": task.queue,
        "pod": POD,
        "container": CONTAINER,
        "attempt": task.attempt,
    }
    request = urllib.request.Request(  # noqa: S310 (the test's own http URL)
        LEDGER_URL,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        response.read()


def handle(task: Task) -> None:
    post("start", task)
    time.sleep(float(task.json.get("seconds", 0)))
    if task.json.get("poison"):
        post("poison", task)
        raise PermanentError("a poison task of the chaos run")
    post("done", task)
