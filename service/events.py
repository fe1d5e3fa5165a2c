"""The event store's one write operation: append an event and fold it, atomically; and
the same for a group of webhooks, in one transaction (group commit, service/groups.py)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

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


def job_stream(conn: psycopg.Connection, job_id: uuid.UUID | str) -> dict[str, Any]:
    """The parameters of a read of one job's events (sql/queries.sql): its stream, and the
    bounds of its events' positions (lo, hi), read first so that the read is planned on the
    partitions that hold them only (job_positions says why). A read in a later statement may
    also see events committed since, up to hi."""
    stream = str(job_id)
    return {"stream": stream, **conn.execute(queries["job_positions"], {"stream": stream}).fetchone()}


def _job_of(stream: str) -> str | None:
    """The job a stream is, for the log line; None for an orphan's stream (a prediction id)."""
    try:
        return str(uuid.UUID(stream))
    except ValueError:
        return None


# Errors that may be one webhook's doing (a body the database cannot hold, a refused
# check), or a deadlock between groups: each webhook of a group failing so is retried
# alone. Any other error (a lost connection, a timeout) is the whole group's answer: a
# retry alone would meet it again, one after the other, while every webhook waits.
ITEM_ERRORS = (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.DeadlockDetected)


def append_webhooks(pool: ConnectionPool, group: Sequence[bytes]) -> list[dict | Exception]:
    """Record a group of verified webhooks in one transaction (append_webhooks, sql/store.sql).

    Each item is one element of its JSON array, serialised. Returns each item's row
    (n, position, duplicate, stream) in the group's order, or the exception to answer it
    with. When the database refuses the group for something one webhook may have caused,
    each is recorded again alone, so one webhook's error is never another's.
    """
    try:
        rows = _append_webhooks(pool, group)
    except ITEM_ERRORS as exc:
        if len(group) == 1:
            return [exc]
        logger.warning("a group of %d webhooks was refused (%s: %s); recording each alone",
                       len(group), type(exc).__name__, exc.diag.message_primary,
                       extra={"action": "webhook_group_refused"})
        return [_append_alone(pool, item) for item in group]
    except psycopg.Error as exc:
        return [exc] * len(group)
    return sorted(rows, key=lambda row: row["n"])


def _append_alone(pool: ConnectionPool, item: bytes) -> dict | Exception:
    try:
        return _append_webhooks(pool, [item])[0]
    except psycopg.Error as exc:
        return exc


def _append_webhooks(pool: ConnectionPool, group: Sequence[bytes]) -> list[dict]:
    array = b"[" + b",".join(group) + b"]"
    with pool.connection() as conn:
        # One statement is its own transaction: autocommit spares the BEGIN and COMMIT
        # round trips (the statement commits before it answers, as the commit did).
        conn.autocommit = True
        try:
            return conn.execute(queries["append_webhooks"],
                                {"group": Jsonb(array, dumps=_verbatim)}).fetchall()
        finally:
            if conn.info.transaction_status == TransactionStatus.IDLE:  # else the pool drops it
                conn.autocommit = False


def _verbatim(text: bytes) -> bytes:
    return text
