"""Log set-up: one line per event, plain text or JSON (JOBTIDE_LOG_FORMAT)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

LOGGER_NAME = "jobtide_worker"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # One strftime a second instead of one a line: a busy worker writes a line per task.
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            line = super().format(record)
        else:
            # The same line as super().format() makes of this format, without its generic
            # steps.
            line = f"{self.formatTime(record)} {record.levelname} {record.getMessage()}"
        fields = getattr(record, "fields", {})
        if fields:
            line += " " + " ".join([f"{k}={_text_value(v)}" for k, v in fields.items()])
        return line


# One regex search instead of a per-character loop: this runs for every field of every task's
# log line.
_NEEDS_QUOTES = re.compile(r'[\s"=]')


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or _NEEDS_QUOTES.search(text)) else text


def setup(log_format: str) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else _TextFormatter())
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    # The record is made here rather than by Logger.log, whose search of the stack for the
    # caller would only ever find this function: a busy worker logs a line per task.
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, __file__, 0, message, (), None)
    record.fields = fields
    logger.handle(record)
