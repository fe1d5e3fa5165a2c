"""What the outside world can ask of a job: create it, cancel it. Each records its event
and enqueues its follow-up work in the caller's transaction, so both or neither happen."""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

import psycopg

from service import events, queue
from service.db import queries
from service.errors import NotFound, ServiceError

logger = logging.getLogger(__name__)

# uuid5 namespace for job ids derived from a client's Idempotency-Key.
_IDEMPOTENCY_NAMESPACE = uuid.UUID("8f1d3c52-6a0e-4a59-9a43-1b6f0f7f4d1e")
JOB_FIELDS = ("model", "version", "deployment", "input", "aspect_ratio", "count",
              "postprocess", "then", "metadata", "cancel_after")


class JobFinished(ServiceError):
    """The job has already finished."""

    code = "job_finished"
    status = 409


def create_job(conn: psycopg.Connection, spec: dict[str, Any],
               idempotency_key: str | None = None, owner_id: str | None = None) -> tuple[str, bool]:
    """Record job.created and enqueue one submission per prediction; returns
    (job id, created) — created is False when the idempotency key was seen before.
    owner_id is the Supabase user creating the job (None for an API key)."""
    job_id = job_id_for(idempotency_key, owner_id)
    data = job_data(spec, owner_id)
    appended = events.append(conn, key=f"created:{job_id}", stream=job_id, type="job.created",
                             data=data, metadata={"source": "api", "idempotency_key": idempotency_key})
    if not appended.duplicate:
        for index in range(data["count"]):
            queue.enqueue(conn, "submit_prediction", f"submit:{job_id}:1:{index}", job_id,
                          {"step": 1, "index": index})
    logger.info("job created" if not appended.duplicate else "job create repeated",
                extra={"action": "create_job", "job_id": job_id, "count": data["count"]})
    return job_id, not appended.duplicate


def job_id_for(idempotency_key: str | None, owner_id: str | None) -> str:
    """A new job id, or the one an Idempotency-Key names: per user, so two users' equal
    keys name two jobs (an API key's jobs keep the ids they always had)."""
    if not idempotency_key:
        return new_job_id()
    scoped = f"user:{owner_id}:{idempotency_key}" if owner_id else idempotency_key
    return str(uuid.uuid5(_IDEMPOTENCY_NAMESPACE, scoped))


def new_job_id() -> str:
    """A UUIDv7 (RFC 9562): the time in Unix milliseconds (48 bits), the version, then 74
    random bits. Every index keyed by job id (jobs_pkey, job_activity_pkey,
    predictions_job_id, the created:<job> keys in event_keys) then grows at one edge, as
    the store's positions and Replicate's webhook ids (KSUIDs, time first) do, so a new
    job's entries land on a few recent pages at any size of the store. With random (v4)
    ids each landed on a page of its own, which at 20M events had left memory and was
    logged whole at its first change after a checkpoint: per append, 6.5 kB of WAL and
    0.35 full-page images, against 5.0 kB and 0.09 with these (docs/performance.md). The
    time part tells nothing created_at does not. The random tail tells two jobs apart, so
    it is what the dashboard shows (its last 8 characters)."""
    raw = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10))
    raw[6] = 0x70 | raw[6] & 0x0F  # version 7
    raw[8] = 0x80 | raw[8] & 0x3F  # variant 10 (RFC 9562)
    return str(uuid.UUID(bytes=bytes(raw)))


def job_data(spec: dict[str, Any], owner_id: str | None) -> dict[str, Any]:
    """The job.created data for a request: its fields, the count, and the owner if any."""
    data = {k: spec[k] for k in JOB_FIELDS if spec.get(k) is not None}
    data.setdefault("count", 1)
    if owner_id:
        data["owner_id"] = owner_id
    return data


def cancel_job(conn: psycopg.Connection, job_id: str, reason: str = "requested") -> list[str]:
    """Record job.canceled and enqueue a cancel for each unfinished prediction; returns
    their ids. Predictions not yet submitted are never submitted."""
    job = conn.execute(queries["job_for_update"], {"id": job_id}).fetchone()
    if job is None:
        raise NotFound(f"no job {job_id}")
    if job["status"] in ("completed", "failed"):
        raise JobFinished(f"job {job_id} has already {job['status']}")
    events.append(conn, key=f"canceled:{job_id}", stream=job_id, type="job.canceled",
                  data={"reason": reason}, metadata={"source": "api"})
    running = [r["id"] for r in conn.execute(queries["unfinished_predictions"], {"job_id": job_id})]
    for prediction_id in running:
        queue.enqueue(conn, "cancel_prediction", f"cancel:{prediction_id}", job_id,
                      {"prediction_id": prediction_id})
    logger.info("job canceled", extra={"action": "cancel_job", "job_id": job_id,
                                       "predictions": len(running)})
    return running


class NotRetryable(ServiceError):
    """The job cannot be retried now."""

    code = "not_retryable"
    status = 409


RETRYABLE = ("failed", "canceled", "aborted")


def retry_job(conn: psycopg.Connection, job_id: str, source: str = "api") -> tuple[int, list[str]]:
    """Record job.retried and enqueue a new submission for each failed, canceled or aborted
    prediction of a finished job; returns (its retry round, the predictions retried). The
    old predictions stay in the job's history, superseded (sql/fold.sql).

    Idempotent: the round is keyed retried:<job>:<n>, n one more than the job's rounds so
    far, under the job's row lock; a job whose latest round is still running answers that
    round with no prediction, so a retry asked twice submits each prediction once."""
    job = conn.execute(queries["job_for_update"], {"id": job_id}).fetchone()
    if job is None:
        raise NotFound(f"no job {job_id}")
    stream = events.job_stream(conn, job_id)
    latest = conn.execute(queries["latest_retry"], stream).fetchone()  # rounds are numbered 1, 2, …
    done = latest["retry"] if latest else 0
    if job["status"] == "canceled":
        raise NotRetryable(f"job {job_id} was canceled; create it again instead")
    if job["status"] not in ("completed", "failed"):
        if done:
            return done, []  # its latest retry is still running
        raise NotRetryable(f"job {job_id} has not finished (it is {job['status']})")
    slots = conn.execute(queries["retryable_predictions"], {"job_id": job_id, **stream}).fetchall()
    if not slots:
        raise NotRetryable(f"job {job_id} has no failed, canceled or aborted prediction to retry")
    retry = done + 1
    events.append(conn, key=f"retried:{job_id}:{retry}", stream=job_id, type="job.retried",
                  data={"retry": retry, "predictions": [s["id"] for s in slots],
                        "slots": [{"prediction_id": s["id"], "step": s["step"], "index": s["index"]}
                                  for s in slots]},
                  metadata={"source": source})
    for s in slots:
        queue.enqueue(conn, "submit_prediction", f"submit:{job_id}:{s['step']}:{s['index']}:retry{retry}",
                      job_id, {"step": s["step"], "index": s["index"], "retry": retry})
    logger.info("job retried", extra={"action": "retry_job", "job_id": job_id, "retry": retry,
                                      "predictions": len(slots)})
    return retry, [s["id"] for s in slots]
