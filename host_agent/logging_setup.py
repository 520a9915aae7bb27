"""Logging for the daemon's edge: readable text (default) or one JSON object per line.

The daemon calls :func:`setup_logging` once, at its edge, before anything logs, with the format
and level of its configuration (``[logging] format = "json"``, ``level = "info"`` in the agent's
TOML file, ``VTPM_LOG_FORMAT``/``VTPM_LOG_LEVEL``, or ``vtpm-host daemon --log-format json
--log-level info``); library code only ever does ``logging.getLogger(__name__)``.
:class:`JsonLogs`, the daemon component that did this before the option existed, still works
but leaves the daemon's own start-up lines in the format it started with.

JSON lines carry ``ts`` (ISO-8601 UTC, milliseconds), ``level``, ``logger`` and ``message``,
then every *extra* field the caller attached (``log.info("sealed", extra={"vm_uuid": u,
"seconds": 0.21})``), then ``exc`` (the formatted traceback) when there is one. Values JSON
cannot hold are written with ``repr``. One line per record, whatever the message contains, so
``jq`` and log shippers (Fluent Bit, Vector, journald's ``MESSAGE``) read it as is.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["LOG_FORMATS", "JsonFormatter", "JsonLogs", "setup_logging"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has; whatever else a record carries came from ``extra=``.
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return str(value) if hasattr(value, "__fspath__") else repr(value)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (no newline inside)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc:
                doc[key] = _jsonable(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def setup_logging(
    fmt: str = "text", level: int | str = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Configure the root logger: one handler on ``stream`` (stderr) in ``fmt``.

    Replaces the root logger's handlers, so calling it again (a test, a reload) does not
    duplicate lines.

    Returns:
        The handler installed.

    Raises:
        ValueError: ``fmt`` is not one of :data:`LOG_FORMATS`, or ``level`` is unknown.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(f"unknown log level {level!r}")
        level = resolved
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


class JsonLogs:
    """Daemon component: switch the process's logs to JSON lines on ``start``, back on ``stop``.

    Keeps the root logger's level and the stream of its first stream handler (stderr if none).
    """

    def __init__(self) -> None:
        self._previous: list[logging.Handler] | None = None

    def start(self, daemon: object = None) -> None:
        del daemon
        root = logging.getLogger()
        self._previous = list(root.handlers)
        stream: TextIO = sys.stderr
        for handler in self._previous:
            if isinstance(handler, logging.StreamHandler):
                stream = handler.stream
                break
        setup_logging("json", root.level, stream)

    def stop(self) -> None:
        if self._previous is None:
            return
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in self._previous:
            root.addHandler(handler)
        self._previous = None
