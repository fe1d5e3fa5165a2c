"""Log lines a person can grep at 3 a.m.: message first, then the context as key=value."""

from __future__ import annotations

import logging

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class ContextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def configure(level: str) -> None:
    """Route the service's loggers to stderr once; later calls only change the level."""
    root = logging.getLogger("service")
    root.setLevel(level)
    if not any(isinstance(h.formatter, ContextFormatter) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(ContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False
