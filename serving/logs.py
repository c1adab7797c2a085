"""Logging for the service's own loggers, as text (default) or JSON lines.

BentoML configures its own `bentoml` loggers but leaves application loggers
silent; this gives ours a handler on stderr. Log records never carry image
bytes or client file names.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

APP_LOGGERS = ("service", "models", "serving")
TEXT_FORMAT = "%(asctime)s [%(levelname)s] [%(name)s] %(message)s"
TEXT_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # as BentoML's own log lines


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))  # structured fields, e.g. of a request's log line
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Send the application loggers to stderr in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT, TEXT_DATE_FORMAT))
    for name in APP_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]  # idempotent: a re-run replaces, never duplicates
        logger.setLevel(level)
        logger.propagate = False
