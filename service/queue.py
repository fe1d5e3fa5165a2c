"""The durable task queue (sql/queue.sql; the table: sql/migrations/005_queue.sql) from Python."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from service.db import queries

logger = logging.getLogger(__name__)
# The retry jitter draws from a generator of its own: the global one is shared with whatever
# else runs in the process (a test's Hypothesis draws check that nothing touches it).
_jitter = random.Random()

KINDS = ("submit_prediction", "cancel_prediction", "process_output")


@dataclass(frozen=True)
class Task:
    id: int
    kind: str
    task_key: str
    job_id: str | None
    payload: dict[str, Any]
    attempts: int
    max_attempts: int

    @property
    def last_attempt(self) -> bool:
        return self.attempts >= self.max_attempts

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Task:
        job = row["job_id"]
        return cls(row["id"], row["kind"], row["task_key"], str(job) if job else None,
                   row["payload"], row["attempts"], row["max_attempts"])


def enqueue(conn: psycopg.Connection, kind: str, key: str, job_id: str | None,
            payload: dict[str, Any], run_after: datetime | None = None, max_attempts: int = 8) -> int:
    """Add a task once per key, in the caller's transaction; returns its id."""
    return conn.execute(queries["enqueue_task"], {
        "kind": kind, "key": key, "job_id": job_id, "payload": Jsonb(payload),
        "run_after": run_after, "max_attempts": max_attempts,
    }).fetchone()["id"]


@dataclass(frozen=True)
class OwnerLimits:
    """Per-owner limits on submissions (OWNER_MAX_RUNNING, OWNER_RATE_LIMIT_PER_MINUTE);
    None is no limit. Jobs with no owner count as one more owner."""

    max_running: int | None = None
    per_minute: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> OwnerLimits:
        return cls(config.get("OWNER_MAX_RUNNING") or None, config.get("OWNER_RATE_LIMIT_PER_MINUTE") or None)


def claim(conn: psycopg.Connection, worker: str, lease_seconds: int,
          kinds: tuple[str, ...] = KINDS, limits: OwnerLimits = OwnerLimits()) -> Task | None:
    """The next task, owners taking turns (sql/queue.sql, claim_task); None when none is ready."""
    row = conn.execute(queries["claim_task"], {
        "worker": worker, "lease": lease_seconds, "kinds": list(kinds),
        "max_running": limits.max_running, "per_minute": limits.per_minute}).fetchone()
    return Task.from_row(row) if row else None


def complete(conn: psycopg.Connection, task: Task, worker: str) -> bool:
    return _finish(conn, task, worker, "done", None, 0.0)


def fail(conn: psycopg.Connection, task: Task, worker: str, error: str) -> bool:
    return _finish(conn, task, worker, "failed", error, 0.0)


def retry(conn: psycopg.Connection, task: Task, worker: str, error: str, delay: float) -> bool:
    return _finish(conn, task, worker, "queued", error, delay)


def release(conn: psycopg.Connection, task: Task, worker: str) -> bool:
    return conn.execute(queries["release_task"], {"id": task.id, "worker": worker}).fetchone()["ok"]


def extend(conn: psycopg.Connection, task: Task, worker: str, lease_seconds: int) -> bool:
    return conn.execute(queries["extend_lease"], {
        "id": task.id, "worker": worker, "lease": lease_seconds}).fetchone()["ok"]


def backoff(attempts: int, base: float = 2.0, cap: float = 300.0) -> float:
    """Seconds before the next attempt: capped exponential with full jitter."""
    return _jitter.uniform(base / 2, min(cap, base * 2 ** max(attempts - 1, 0)))


def _finish(conn: psycopg.Connection, task: Task, worker: str, status: str, error: str | None,
            delay: float) -> bool:
    ok = conn.execute(queries["finish_task"], {
        "id": task.id, "worker": worker, "status": status, "error": error, "delay": delay,
    }).fetchone()["ok"]
    if not ok:  # its lease ran out and another worker took it over; that one finishes it
        logger.warning("task lease lost before finishing", extra={
            "action": "task_lease_lost", "task_id": task.id, "task_kind": task.kind, "worker": worker})
    return ok
