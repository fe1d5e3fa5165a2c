"""The reconciler: asks Replicate about jobs that have gone quiet, so a lost webhook never
leaves a job stuck, gives failed submissions another round, and ends a job that waits for
nothing (a stall: a lost task, or a bug) by the fold's own rules."""

from __future__ import annotations

import logging
from collections import Counter

from service import events, metrics, queue
from service.db import queries
from service.errors import ServiceError
from service.postprocess import loggable_url
from service.submissions import ROUNDS, record_polled, slot
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
    done.update(_end_stalled(ctx, quiet, limit))
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
            where = slot(row["job_id"], payload["step"], payload["index"], payload.get("retry", 0))
            key = f"submit:{where}:r{payload['round']}"
            queue.enqueue(conn, "submit_prediction", key, row["job_id"], payload)
    return len(failed)


# Said in the error of what the reconciler records for a stalled job.
ENDED = "the reconciler found nothing running or queued for it"


def _end_stalled(ctx: Context, quiet: float, limit: int) -> Counter:
    """Jobs not ended with nothing under way: record what each lacks as the failure the
    worker would have recorded (an output that failed, a submission refused for good), so the
    fold ends the job by its usual rules, and a replay gives the same rows. "stalled" counts
    the jobs so ended; "stalled_unexplained" those that lack nothing the events can say."""
    done: Counter = Counter()
    with ctx.pool.connection() as conn:
        stalled = conn.execute(queries["stalled_jobs"],
                               {"quiet_seconds": quiet, "rounds": ROUNDS, "limit": limit}).fetchall()
    for job in stalled:
        with ctx.pool.connection() as conn:  # one transaction per job
            recorded = _settle(conn, job)
        outcome = "stalled" if recorded else "stalled_unexplained"
        done[outcome] += 1
        metrics.STALLED_JOBS.labels("ended" if recorded else "unexplained").inc()
        log = logger.warning if recorded else logger.error
        log("stalled job: %s", f"{recorded} failure(s) recorded" if recorded else "nothing to record",
            extra={"action": "reconcile_stalled", "job_id": job["job_id"], "status": job["status"]})
    return done


def _settle(conn, job: dict) -> int:
    """Record the failures that end a stalled job: its outputs never post-processed, else the
    slots of its first unfinished step that hold no prediction. Returns how many were new."""
    job_id = job["job_id"]
    outputs = conn.execute(queries["unprocessed_outputs"], {"job_id": job_id}).fetchall()
    appended = [_output_failed(conn, job_id, o) for o in outputs] or [
        _slot_failed(conn, job_id, step, index, retry, refusal)
        for step, index, retry, refusal in _open_slots(conn, job)]
    return sum(not a.duplicate for a in appended)


def _open_slots(conn, job: dict) -> list[tuple[int, int, int, str | None]]:
    """(step, index, retry round, the refusal recorded for it if any) of each slot the first
    step short of predictions lacks in the job's latest round: not submitted in that round,
    and no refusal for good counted in that step. The first round (0) has every slot; a
    retry round only those job.retried submitted again (the others keep their predictions),
    and the predictions it superseded count no more."""
    job_id = job["job_id"]
    rows = conn.execute(queries["job_predictions_by_step"], {"job_id": job_id}).fetchall()
    counted = Counter(r["step"] for r in rows)
    steps = {r["id"]: r["step"] for r in rows}
    stream = events.job_stream(conn, job_id)
    latest = conn.execute(queries["latest_retry"], stream).fetchone()
    retry = latest["retry"] if latest else 0
    said = [r for r in conn.execute(queries["submission_slots"], stream).fetchall()
            if r["retry"] == str(retry)]
    submitted = {(r["step"], r["index"]) for r in said if r["type"] == "prediction.submitted"}
    refusals = {(r["step"], r["index"]): r["error"] for r in said
                if r["type"] == "prediction.submit_failed" and r["final"]}
    first = job["predictions_expected"] - int(job["has_next"])
    for step, expected in ((1, first), (2, int(job["has_next"]))):
        if counted[step] >= expected:
            continue
        slots = (sorted(s["index"] for s in latest["slots"] or [] if s["step"] == step) if retry
                 else range(expected))
        open_ = [i for i in slots if (str(step), str(i)) not in submitted
                 and steps.get(f"unsubmitted-{slot(job_id, step, i, retry, '-')}") != step]
        return [(step, i, retry, refusals.get((str(step), str(i)))) for i in open_[:expected - counted[step]]]
    return []


def _slot_failed(conn, job_id: str, step: int, index: int, retry: int,
                 refusal: str | None) -> events.Appended:
    """A refusal for good, as SubmitPrediction.give_up records one (in the slot's retry
    round): the refusal the slot already had (counted in no step, as the fold before issue
    21 left it), or a new one."""
    error = refusal or f"step {step}'s prediction {index + 1} was never submitted: {ENDED}"
    return events.append(
        conn, key=f"submit_failed:{slot(job_id, step, index, retry)}:stalled", stream=job_id,
        type="prediction.submit_failed",
        data={"step": step, "index": index, "error": error, "final": True, "stalled": True,
              "prediction_id": f"unsubmitted-{slot(job_id, step, index, retry, '-')}",
              **({"retry": retry} if retry else {})},
        metadata={"source": "reconciler"})


def _output_failed(conn, job_id: str, output: dict) -> events.Appended:
    """An output that failed, as ProcessOutput.give_up records one."""
    return events.append(
        conn, key=f"stalled:{output['prediction_id']}:{output['index']}", stream=job_id,
        type="output.failed",
        data={"prediction_id": output["prediction_id"], "index": output["index"],
              "source_url": loggable_url(output["source_url"]),
              "error": f"never post-processed: {ENDED}", "stalled": True},
        metadata={"source": "reconciler"})
