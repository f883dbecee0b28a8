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

from jobtide_worker.priority import node_booted_unix_seconds


def booted_at(unix_seconds: float) -> list[str]:
    """The argv prefix under which a command reads `unix_seconds` (whole seconds) as the
    kernel's boot time: util-linux `unshare`, as root. A namespace's boot clock may not go
    below zero, so the time lies between the host's boot and now."""
    host = node_booted_unix_seconds()
    if host is None:
        raise RuntimeError("/proc/stat has no btime: no boot time to shift")
    # In the namespace the boot time reads as the host's minus the boot clock's offset.
    offset = int(host) - math.floor(unix_seconds)
    return ["unshare", "--time", f"--boottime={offset}", "--"]
