"""Processes that see a node's boot time.

The test bed runs the workers of several nodes on one kernel, where every process reads the
same boot time. On a real node a container shares its node's kernel, and the worker's node
priority (`jobtide_worker.priority`) reads the node's boot time from /proc/stat. `booted_at`
gives a command a time namespace of its own (Linux 5.6 on) whose boot clock is set back so
that the kernel's boot time it reads is the given one, the node's: the same file, the same
code path, another node.
"""

from __future__ import annotations

import math
import time

from jobtide_worker.priority import node_booted_unix_seconds


def earliest_start(unix_seconds: float) -> float:
    """When a process can first be given `unix_seconds` as its boot time: the namespace's
    boot clock may not be negative, and its boot instant carries the host's fraction of a
    second, so up to a second after the boot time's whole second (a node's pods start
    later anyway: it boots first)."""
    return math.floor(unix_seconds) + 1.0


def booted_at(unix_seconds: float) -> list[str]:
    """The argv prefix under which a command reads `unix_seconds` (whole seconds) as the
    kernel's boot time: util-linux `unshare`, as root. The time lies after the host's boot,
    and now is `earliest_start(unix_seconds)` or later."""
    if time.time() < earliest_start(unix_seconds):
        raise ValueError(f"boot time {unix_seconds:.0f}: less than a second ago or later")
    host = node_booted_unix_seconds()
    if host is None:
        raise RuntimeError("/proc/stat has no btime: no boot time to shift")
    # In the namespace the boot time reads as the host's minus the boot clock's offset.
    offset = int(host) - math.floor(unix_seconds)
    return ["unshare", "--time", f"--boottime={offset}", "--"]
