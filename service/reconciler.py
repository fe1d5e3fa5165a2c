"""The reconciler: asks Replicate about jobs that have gone quiet, so a lost webhook never
leaves a job stuck, and gives failed submissions another round."""

from __future__ import annotations

import logging
from collections import Counter

from service import metrics, queue
from service.db import queries
from service.errors import ServiceError
from service.submissions import ROUNDS, record_polled
from service.worker import Context

logger = logging.getLogger(__name__)


def quiet_seconds(config: dict) -> float:
    """How long a job may go without an event before it is polled: RECONCILE_AFTER_SECONDS
    when Replicate can reach us by webhook; at most 10 s when polling is the only way."""
    quiet = config["RECONCILE_AFTER_SECONDS"]
    return quiet if config.get("PUBLIC_BASE_URL") else min(quiet, 10)


def reconcile(ctx: Context, limit: int = 200) -> Counter:
    """One pass; returns what it did, by kind."""
    done: Counter = Counter()
    quiet = quiet_seconds(ctx.config)
    with ctx.pool.connection() as conn:
        stale = conn.execute(queries["quiet_predictions"],
                             {"quiet_seconds": quiet, "limit": limit}).fetchall()
    for row in stale:
        done[_poll(ctx, row)] += 1
    done["resubmitted"] = _resubmit(ctx, quiet, limit)
    for action, n in done.items():
        metrics.RECONCILER_ACTIONS.labels(action).inc(n)
    if sum(done.values()):
        logger.info("reconciled", extra={"action": "reconcile", **done})
    return done


def _poll(ctx: Context, row: dict) -> str:
    try:
        prediction = ctx.clients["replicate"].get_prediction(row["id"])
    except ServiceError as exc:
        logger.warning("poll failed: %s", exc, extra={"action": "reconcile_poll",
                                                      "prediction_id": row["id"], "job_id": row["job_id"]})
        return "poll_failed"
    with ctx.pool.connection() as conn:
        appended = record_polled(conn, row["job_id"], prediction, source="reconciler", step=row["step"])
    return "unchanged" if appended.duplicate else "polled"


def _resubmit(ctx: Context, quiet: float, limit: int) -> int:
    with ctx.pool.connection() as conn:
        failed = conn.execute(queries["failed_submissions"],
                              {"rounds": ROUNDS, "quiet_seconds": quiet, "limit": limit}).fetchall()
        for row in failed:
            payload = dict(row["payload"], round=row["payload"].get("round", 0) + 1)
            key = f"submit:{row['job_id']}:{payload['step']}:{payload['index']}:r{payload['round']}"
            queue.enqueue(conn, "submit_prediction", key, row["job_id"], payload)
    return len(failed)
