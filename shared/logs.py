"""Log output of the FedNano processes: readable text lines (the default) or JSON lines.

JSON lines carry the ids a log pipeline filters on when a call site names them with
``extra={"device_id": ..., "round_id": ..., "update_id": ...}`` (also ``request_id`` and
``task_id``); each line is one object with ``ts`` (UTC, ISO 8601), ``level``, ``logger``,
``message``, those ids, and ``exc`` when a traceback was logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

FORMATS = ("text", "json")
ID_FIELDS = ("device_id", "round_id", "update_id", "task_id", "request_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record (no newline inside: tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class _Constant(logging.Filter):
    """Adds the same fields to every record (e.g. a device's own id), unless a call site set
    them."""

    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self.fields.items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def configure(log_format: str = "text", level: int | str = logging.INFO,
              fields: dict[str, Any] | None = None, *, force: bool = False) -> None:
    """Send the root logger's records to stderr as ``log_format`` (text or json) lines;
    ``fields`` (e.g. ``{"device_id": ...}``) go into every JSON line. Like
    ``logging.basicConfig``, nothing changes when the root logger has handlers already (a
    host application's, or a test runner's) unless ``force``."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    if fields:
        handler.addFilter(_Constant(fields))
    logging.basicConfig(level=level, handlers=[handler], force=force)
