"""The event store's one write operation: append an event and fold it, atomically."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from service.db import queries, translated_errors

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Appended:
    position: int
    duplicate: bool


def append(
    conn: psycopg.Connection,
    *,
    key: str,
    stream: str,
    type: str,
    data: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> Appended:
    """Record one event and apply it to the projections in the current transaction.

    A duplicate `key` records nothing and returns the original position. The caller
    commits; nothing is acknowledged before that.
    """
    with translated_errors():
        row = conn.execute(queries["append_event"], {
            "event_key": key, "stream": stream, "type": type,
            "data": Jsonb(data), "metadata": Jsonb(metadata or {}),
        }).fetchone()
    result = Appended(position=row["position"], duplicate=row["duplicate"])
    logger.info("event %s", "duplicate" if result.duplicate else "appended", extra={
        "action": "append_event", "event_key": key, "stream": stream, "job_id": _job_of(stream),
        "event_type": type,
        "position": result.position, "duplicate": result.duplicate,
    })
    return result


def _job_of(stream: str) -> str | None:
    """The job a stream is, for the log line; None for an orphan's stream (a prediction id)."""
    try:
        return str(uuid.UUID(stream))
    except ValueError:
        return None
