"""The smallest jobtide handler: sleep for the task's `seconds`, then succeed."""

import time

from jobtide_worker import Task


def handle(task: Task) -> None:
    seconds = float(task.json.get("seconds", 0)) if isinstance(task.json, dict) else 0.0
    time.sleep(seconds)
