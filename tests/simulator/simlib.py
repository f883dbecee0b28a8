"""What the simulator's tests share: settings simple enough to work figures out by hand, and
how a benchmark prints its report."""

from __future__ import annotations

import pytest
from jobtide_scaler.simulate.engine import Settings

# One message per worker, a 5 s poll and idle timeout, a start-up of exactly 5 s; an idle
# worker leaves by its idle timeout alone (no reads of the queue's counters, unless a test
# turns them on), so that each case's figures follow from the mechanism it is about.
FIXED = Settings(
    poll_interval_seconds=5,
    messages_per_worker=1,
    idle_timeout_seconds=5,
    quiet_check_seconds=0,
    startup_seconds=(5, 5),
    max_workers=20,
)


def show(capsys: pytest.CaptureFixture[str], lines: list[str]) -> None:
    """Prints a benchmark's report past pytest's capture (run with -s or not)."""
    with capsys.disabled():
        print("\n" + "\n".join(lines))
