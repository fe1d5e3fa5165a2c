"""Log lines for people and for log pipelines: LOG_FORMAT=json writes one JSON object per
line, LOG_FORMAT=text the message first, then the context as key=value.

Context bound with `bound(...)` (the webhook's ids, the task's job and prediction) is
added to every line logged inside it, by any module, so a line about a job always
carries its job_id without each call site repeating it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

FORMATS = ("json", "text")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("log_context", default=_EMPTY)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add these fields (None ones skipped) to every log line inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def context_of(record: logging.LogRecord) -> dict[str, Any]:
    """The bound context and the record's own extras; the record's win."""
    extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
    return {**_context.get(), **extras}


class ContextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = context_of(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


# json.dumps with options builds a new encoder each call; this one, made once, writes the same.
_JSON = json.JSONEncoder(default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the context fields."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[float, str] = (-1.0, "")  # the last second formatted, and its text

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.timestamp(record.created), "level": record.levelname, "logger": record.name,
            "message": record.getMessage()}
        entry.update(context_of(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _JSON.encode(entry)

    def timestamp(self, created: float) -> str:
        """What datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds") says,
        with the date and time of day formatted once a second rather than once a line (a
        webhook writes a line: this was a fifth of the formatting)."""
        fraction, second = math.modf(created)
        microseconds = round(fraction * 1e6)  # rounded as fromtimestamp rounds, half to even
        if microseconds >= 1_000_000:
            second, microseconds = second + 1, microseconds - 1_000_000
        cached, text = self._second
        if second != cached:
            text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (second, text)
        return f"{text}.{microseconds // 1000:03d}+00:00"


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    return ContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure(level: str, log_format: str = "text") -> None:
    """Route the service's loggers to stderr once; later calls change the level and format."""
    root = logging.getLogger("service")
    root.setLevel(level)
    ours = [h for h in root.handlers if getattr(h, "_service_handler", False)]
    handler = ours[0] if ours else logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    if not ours:
        handler._service_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
