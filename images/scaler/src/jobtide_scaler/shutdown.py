"""SIGTERM and SIGINT end the loop between cycles, never in the middle of creating Jobs."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


class GracefulShutdown:
    def __init__(self) -> None:
        self._requested = threading.Event()

    def install(self) -> GracefulShutdown:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping after this cycle", signal.Signals(signum).name)
        self._requested.set()

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if shutdown was requested meanwhile."""
        return self._requested.wait(seconds)
