"""Upkeep of the event store: partitions of events created ahead of the appends
(maintain_event_partitions, sql/store.sql). The worker runs it with its periodic work;
migrate runs it too."""

from __future__ import annotations

import logging

import psycopg
from psycopg_pool import ConnectionPool

from service.db import queries

logger = logging.getLogger(__name__)


def maintain_partitions(conn: psycopg.Connection) -> list[str]:
    """Create the partitions of events the next appends need, moving any event the default
    partition caught into one of its own; returns the partitions created. Commits."""
    with conn.transaction():
        created = [row["partition"] for row in conn.execute(queries["maintain_event_partitions"])]
    if created:
        logger.info("created %d partition(s) of events: %s", len(created), ", ".join(created),
                    extra={"action": "maintain_partitions", "partitions": created})
    return created


def upkeep(pool: ConnectionPool) -> None:
    """The store's periodic work, for the worker."""
    with pool.connection() as conn:
        maintain_partitions(conn)
