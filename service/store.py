"""Upkeep of the event store: partitions of events and of the delivery log created ahead of
the appends (maintain_event_partitions, maintain_delivery_partitions in sql/store.sql), and
retention, which drops the delivery log's expired days (prune_deliveries). The worker runs
them with its periodic work (retention once a day); migrate creates partitions too."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg_pool import ConnectionPool

from service.db import queries

logger = logging.getLogger(__name__)

PRUNE_EVERY = timedelta(days=1)
# Creating or dropping a partition locks its parent table exclusively, briefly; while the
# lock is wanted, appends queue behind it. Should a long query (a report over events, a
# replay's snapshot) hold the table, give up after this long and try again next round
# rather than hold every webhook behind it: partitions are made two million positions and
# three days ahead.
LOCK_TIMEOUT = "2s"


@dataclass(frozen=True)
class Pruned:
    partition: str
    day: date
    bytes: int


def maintain_partitions(conn: psycopg.Connection) -> list[str]:
    """Create the partitions of events and of the delivery log the next appends need,
    moving any row a default partition caught into one of its own; returns the partitions
    created. Commits."""
    try:
        with conn.transaction():
            conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            created = [row["partition"] for row in conn.execute(queries["maintain_event_partitions"])]
            created += [row["partition"] for row in conn.execute(queries["maintain_delivery_partitions"])]
    except psycopg.errors.LockNotAvailable:
        logger.warning("partitions not maintained: events or deliveries stayed locked for %s; "
                       "trying again next round", LOCK_TIMEOUT, extra={"action": "maintain_partitions"})
        return []
    if created:
        logger.info("created %d partition(s): %s", len(created), ", ".join(created),
                    extra={"action": "maintain_partitions", "partitions": created})
    return created


def prune(conn: psycopg.Connection, retention_days: int, *, dry_run: bool = False,
          today: date | None = None) -> list[Pruned]:
    """Drop the delivery log's days older than retention_days (0: none) counted back from
    today (UTC; another day: as of then); with dry_run, only say which. Events are never
    touched. Commits."""
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        rows = conn.execute(queries["prune_deliveries"],
                            {"days": retention_days, "dry_run": dry_run, "today": today}).fetchall()
    pruned = [Pruned(r["partition"], r["day"], r["bytes"]) for r in rows]
    if not dry_run:
        logger.info("retention: dropped %d day(s) of the delivery log, %d bytes freed", len(pruned),
                    sum(p.bytes for p in pruned),
                    extra={"action": "prune", "retention_days": retention_days,
                           "partitions": [p.partition for p in pruned]})
    return pruned


def last_prune(conn: psycopg.Connection) -> datetime | None:
    return conn.execute(queries["last_prune"]).fetchone()["ran_at"]


def upkeep(pool: ConnectionPool, retention_days: int) -> None:
    """The store's periodic work, for the worker: partitions ahead every time; retention
    when it has not run for a day (by any worker: the time is in the database)."""
    with pool.connection() as conn:
        maintain_partitions(conn)
        ran = last_prune(conn)
        if ran is None or datetime.now(UTC) - ran >= PRUNE_EVERY:
            prune(conn, retention_days)
