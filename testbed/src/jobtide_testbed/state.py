"""Where `python -m jobtide_testbed up` keeps what it started, for `down`, `status` and the
demo: $JOBTIDE_TESTBED_DIR (default $JOBTIDE_CACHE/testbed)."""

from __future__ import annotations

import os
from pathlib import Path

from jobtide_testbed.tools import CACHE

STATE_DIR = Path(os.environ.get("JOBTIDE_TESTBED_DIR", CACHE / "testbed"))
STATE_FILE = STATE_DIR / "state.json"
