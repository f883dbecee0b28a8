"""The consumer priority a worker consumes with (RabbitMQ's `x-priority` consume argument).

RabbitMQ hands each message to the highest-priority consumer with a free prefetch slot, and
round-robins only among equal priorities. With `node` (the default) the workers of an older
node have a higher priority, and the workers of one node share theirs: when the load falls,
the youngest node's workers get nothing, leave (by their idle timeout, or once the queue is
silent) and the node empties, while the workers of the nodes that stay up share the trickle
round-robin, so none of them starves and leaves for a new one to be started later. With `age`
an older worker has a higher priority, whatever its node: the youngest workers starve first,
wherever they run. With `none` the worker sends no priority: plain round-robin.
"""

from __future__ import annotations

import math
from pathlib import Path

NODE = "node"
AGE = "age"
NONE = "none"
MODES = (NODE, AGE, NONE)
DEFAULT = NODE

# AMQP's signed 32-bit integer, which every RabbitMQ version accepts for `x-priority`; only
# non-negative values are used, so the default priority 0 of other consumers is never above.
MAX_PRIORITY = 2**31 - 1
# Priorities count seconds down from MAX_PRIORITY from here: distinct for 68 years after it.
EPOCH_UNIX_SECONDS = 1_577_836_800  # 2020-01-01T00:00:00Z
# The kernel's boot time; a container shares its node's kernel (and its time namespace,
# unless the runtime gives it one of its own), so this is the node's boot time, read with no
# permission and no API call.
KERNEL_STATISTICS = Path("/proc/stat")


def node_booted_unix_seconds(statistics: Path = KERNEL_STATISTICS) -> float | None:
    """The node's boot time (`btime` of /proc/stat, whole seconds), or None where it cannot
    be read (a sandboxed runtime without it)."""
    try:
        text = statistics.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "btime":
            try:
                return float(int(value.strip()))
            except ValueError:
                return None
    return None


def consumer_priority(
    mode: str, started_unix_seconds: float, node_booted_unix_seconds: float | None = None
) -> int | None:
    """The `x-priority` of a worker, or None for no priority. `age`: from the worker's start
    (wall clock, so that workers on different nodes compare); `node`: from its node's boot,
    or, when that is unknown, from the worker's start. Computed once per worker, so it is
    the same on every reconnect. Workers started (nodes booted) within the same second share
    a priority and round-robin among themselves."""
    if mode not in MODES:
        raise ValueError(f"consumer priority mode must be one of {', '.join(MODES)}: {mode!r}")
    if mode == NONE:
        return None
    since = started_unix_seconds
    if mode == NODE and node_booted_unix_seconds is not None:
        since = node_booted_unix_seconds
    seconds = math.floor(since) - EPOCH_UNIX_SECONDS
    return max(0, min(MAX_PRIORITY, MAX_PRIORITY - seconds))
