"""Logging for the service's own loggers, as text (default) or JSON lines.

BentoML configures its own `bentoml` loggers but leaves application loggers
silent; this gives ours a handler on stderr. Log records never carry image
bytes or client file names.

BentoML logs every input it refuses (a 4xx) at ERROR with a full traceback,
whose validation messages quote the first and last bytes of the body or the
file name. :class:`ClientErrorFilter` turns those records into one WARNING
line that names the route and the kind of error only; server errors keep
their traceback.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import pythonjsonlogger.json

APP_LOGGERS = ("service", "models", "serving")
BENTOML_REQUEST_LOGGER = "bentoml._internal.server.http_app"  # where BentoML logs a request's exception
TEXT_FORMAT = "%(asctime)s [%(levelname)s] [%(name)s] %(message)s"
TEXT_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # as BentoML's own log lines


class JsonFormatter(pythonjsonlogger.json.JsonFormatter):
    """One JSON object per line: time, level, logger, message, a record's `extra` fields, and exception."""

    def __init__(self) -> None:
        super().__init__(
            ["asctime", "levelname", "name", "message"],
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "exc_info": "exception"},
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def _is_client_error(error: BaseException | None) -> bool:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return True
    return isinstance(error, BentoMLException) and int(error.error_code) < 500


class ClientErrorFilter(logging.Filter):
    """Rewrite BentoML's ERROR-with-traceback for a refused input into one WARNING line without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if _is_client_error(error):
            path, method = (record.args or ("?", "?"))[:2] if isinstance(record.args, tuple) else ("?", "?")
            record.msg = "client error on %s [%s]: %s (details withheld: they may quote the upload)"
            record.args = (path, method, type(error).__name__)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Send the application loggers to stderr in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT, TEXT_DATE_FORMAT))
    for name in APP_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]  # idempotent: a re-run replaces, never duplicates
        logger.setLevel(level)
        logger.propagate = False
    bentoml_requests = logging.getLogger(BENTOML_REQUEST_LOGGER)
    if not any(isinstance(f, ClientErrorFilter) for f in bentoml_requests.filters):
        bentoml_requests.addFilter(ClientErrorFilter())
