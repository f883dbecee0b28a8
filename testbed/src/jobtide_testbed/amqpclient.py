"""Publishing with a client that is not pika: Node's amqplib (`ci/setup amqplib`), through
the script `amqp_publish.cjs` beside this module, which describes the message format."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jobtide_testbed.process import run
from jobtide_testbed.tools import CACHE, ensure_stage

SCRIPT = Path(__file__).resolve().parent / "amqp_publish.cjs"
AMQPLIB = CACHE / "amqplib" / "node_modules"


def publish(url: str, queues: Sequence[str], messages: Sequence[dict[str, Any]]) -> int:
    """Publish every message to every queue with amqplib and publisher confirms; how many
    the broker confirmed. Raises with the script's output when it fails."""
    if not AMQPLIB.exists():
        ensure_stage("amqplib")
    node = shutil.which("node")
    if node is None:
        raise FileNotFoundError("node is not on PATH after `ci/setup amqplib`")
    request = json.dumps({"url": url, "queues": list(queues), "messages": list(messages)})
    done = run(
        [node, str(SCRIPT)],
        env={**os.environ, "NODE_PATH": str(AMQPLIB)},
        stdin=request,
        timeout=300,
    )
    confirmed: int = json.loads(done.stdout)["confirmed"]
    return confirmed
