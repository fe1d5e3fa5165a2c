"""Task handlers that talk to Replicate: submit a job's prediction, cancel one."""

from __future__ import annotations

import logging
import re
import time
from typing import Any
from urllib.parse import urlencode

from service import events, queue
from service.db import queries
from service.errors import DeadlineExceeded, ServiceError
from service.queue import Task
from service.worker import Context

logger = logging.getLogger(__name__)

DEADLINE_EXCEEDED = "deadline exceeded"  # the reason a job stopped by its deadline gives (sql/fold.sql)
ROUNDS = 3  # a submission that keeps failing transiently is retried by the reconciler this often


def webhook_url(config: dict[str, Any], job_id: str, step: int, index: int, retry: int = 0) -> str | None:
    """Where Replicate should send this prediction's webhooks; None without a public URL
    (then the reconciler's polling completes the job). The index (and the job's retry
    round, after the first) lets a retried submission recognise a prediction its earlier
    attempt started."""
    base = config.get("PUBLIC_BASE_URL")
    query = urlencode({"job": job_id, "step": step, "index": index, **({"retry": retry} if retry else {})})
    return f"{base}/webhooks/replicate?{query}" if base else None


def slot(job_id: str, step: int, index: int, retry: int = 0, sep: str = ":") -> str:
    """A prediction's place in its job: step, index, and the retry round (none the first
    time). Part of every key its submission records, so each round submits it once."""
    return sep.join([str(job_id), str(step), str(index)] + ([f"retry{retry}"] if retry else []))


_OUTPUT_REF = re.compile(r"\{\{outputs\[(\d+)\]\}\}")


class StepInputError(ServiceError):
    """The second step's input refers to an output the first step did not produce."""

    code = "step_input_error"
    status = 422
    transient = False


def step_request(job: dict[str, Any], step: int, public_base: str | None) -> tuple[dict, Any]:
    """(model/version/deployment, input) of a job's step. Step 2 comes from `then`, with
    each {{outputs[N]}} replaced by the URL of step 1's N-th processed output."""
    if step == 1:
        return {k: job[k] for k in ("version", "model", "deployment")}, job["input"]
    spec = job["next_step"]
    urls = [_absolute(o["url"], public_base) for o in job["outputs"] if o.get("step", 1) == 1]
    target = {k: spec.get(k) for k in ("version", "model", "deployment")}
    return target, _fill(spec.get("input", {}), urls)


def _fill(value: Any, urls: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, urls) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, urls) for v in value]
    if isinstance(value, str):
        return _OUTPUT_REF.sub(lambda m: _output(urls, int(m.group(1))), value)
    return value


def _output(urls: list[str], n: int) -> str:
    if n >= len(urls):
        raise StepInputError(f"the second step refers to outputs[{n}], but the first step "
                             f"processed {len(urls)} output{'s' if len(urls) != 1 else ''}")
    return urls[n]


def _absolute(url: str, public_base: str | None) -> str:
    """Replicate must be able to fetch it: a path on this service becomes a full URL."""
    return f"{public_base}{url}" if url.startswith("/") and public_base else url


class SubmitPrediction:
    def run(self, ctx: Context, task: Task) -> None:
        job_id, step, index = task.job_id, task.payload["step"], task.payload["index"]
        retry = task.payload.get("retry", 0)
        with ctx.pool.connection() as conn:
            job = conn.execute(queries["job_by_id"], {"id": job_id}).fetchone()
        if job is None or job["status"] == "canceled":
            self._skip(ctx, task, "job canceled" if job else "job unknown")
            return
        # the time left, by the database's clock (the one the deadline was set by)
        deadline = None if job["seconds_left"] is None else time.monotonic() + job["seconds_left"]
        target, input_ = step_request(job, step, ctx.config.get("PUBLIC_BASE_URL"))
        try:
            prediction = self._started_earlier(ctx, task) or ctx.clients["replicate"].create_prediction(
                **target, input=input_, webhook=webhook_url(ctx.config, job_id, step, index, retry),
                deadline=deadline)
        except DeadlineExceeded:
            self._not_sent(ctx, task)
            return
        with ctx.pool.connection() as conn:
            events.append(conn, key=f"submitted:{slot(job_id, step, index, retry)}", stream=job_id,
                          type="prediction.submitted",
                          data={"step": step, "index": index, "prediction": prediction,
                                **({"retry": retry} if retry else {})},
                          metadata={"source": "worker", "task_id": task.id, "attempt": task.attempts,
                                    "cancel_after_seconds": job["seconds_left"]})
            self._cancel_if_job_canceled(conn, job_id, prediction["id"])
            queue.complete(conn, task, ctx.worker)
        logger.info("prediction submitted", extra={"action": "submit", "job_id": job_id,
                                                   "prediction_id": prediction.get("id"), "step": step})

    def _cancel_if_job_canceled(self, conn, job_id: str, prediction_id: str) -> None:
        """A cancel that came while this submission was in flight could not know of this
        prediction. append took the job's stream lock, so the job status read now includes
        any cancel committed before; a cancel committing after sees this prediction itself."""
        job = conn.execute(queries["job_by_id"], {"id": job_id}).fetchone()
        if job["status"] == "canceled":
            queue.enqueue(conn, "cancel_prediction", f"cancel:{prediction_id}", job_id,
                          {"prediction_id": prediction_id})

    def _started_earlier(self, ctx: Context, task: Task) -> dict[str, Any] | None:
        """On a retry: the prediction an earlier attempt started, if Replicate has told us
        of it by webhook (its answer to that attempt may have been lost)."""
        if task.attempts <= 1:
            return None
        with ctx.pool.connection() as conn:
            row = conn.execute(queries["prediction_for_slot"], {
                **events.job_stream(conn, task.job_id), "step": str(task.payload["step"]),
                "index": str(task.payload["index"]), "retry": str(task.payload.get("retry", 0))}).fetchone()
        if row:
            logger.warning("adopting a prediction an earlier attempt started", extra={
                "action": "submit_adopt", "job_id": task.job_id, "prediction_id": row["data"]["id"]})
        return row["data"] if row else None

    def give_up(self, ctx: Context, task: Task, reason: str, final: bool) -> None:
        job_id, step, index = task.job_id, task.payload["step"], task.payload["index"]
        retry, round_ = task.payload.get("retry", 0), task.payload.get("round", 0)
        final = final or round_ + 1 >= ROUNDS
        with ctx.pool.connection() as conn:
            data = {"step": step, "index": index, "error": reason, "final": final, "round": round_}
            if retry:
                data["retry"] = retry
            if final:  # the fold shows it as a failed prediction standing in for the missing one
                data["prediction_id"] = f"unsubmitted-{slot(job_id, step, index, retry, '-')}"
            events.append(conn, key=f"submit_failed:{slot(job_id, step, index, retry)}:{round_}",
                          stream=job_id, type="prediction.submit_failed", data=data,
                          metadata={"source": "worker", "task_id": task.id, "attempts": task.attempts})
            queue.fail(conn, task, ctx.worker, reason)

    def _not_sent(self, ctx: Context, task: Task) -> None:
        """The job's deadline passed while this submission waited: it is never sent, and a
        failed prediction with the reason stands in for it, so the job ends."""
        job_id, step, index = task.job_id, task.payload["step"], task.payload["index"]
        retry = task.payload.get("retry", 0)
        with ctx.pool.connection() as conn:
            data = {"step": step, "index": index, "error": DEADLINE_EXCEEDED, "final": True,
                    "prediction_id": f"unsubmitted-{slot(job_id, step, index, retry, '-')}",
                    **({"retry": retry} if retry else {})}
            events.append(conn, key=f"not_sent:{slot(job_id, step, index, retry)}", stream=job_id,
                          type="prediction.submit_failed", data=data,
                          metadata={"source": "worker", "task_id": task.id, "attempts": task.attempts})
            queue.complete(conn, task, ctx.worker)
        logger.warning("submission not sent: the job's deadline has passed", extra={
            "action": "submit_deadline", "job_id": job_id, "step": step, "index": index})

    def _skip(self, ctx: Context, task: Task, why: str) -> None:
        with ctx.pool.connection() as conn:
            queue.complete(conn, task, ctx.worker)
        logger.info("submission skipped: %s", why, extra={"action": "submit_skipped",
                                                           "job_id": task.job_id})


class CancelPrediction:
    def run(self, ctx: Context, task: Task) -> None:
        prediction = ctx.clients["replicate"].cancel_prediction(task.payload["prediction_id"])
        with ctx.pool.connection() as conn:
            record_polled(conn, task.job_id, prediction, source="cancel")
            queue.complete(conn, task, ctx.worker)

    def give_up(self, ctx: Context, task: Task, reason: str, final: bool) -> None:
        with ctx.pool.connection() as conn:
            queue.fail(conn, task, ctx.worker, reason)


def record_polled(conn, job_id: str | None, prediction: dict[str, Any], source: str,
                  step: int | None = None) -> events.Appended:
    """Record what Replicate said when asked; the same status asked twice records once."""
    return events.append(
        conn, key=f"polled:{prediction['id']}:{prediction['status']}", stream=job_id or prediction["id"],
        type="replicate.polled", data=prediction,
        metadata={"source": source, "query": {"job": job_id, "step": None if step is None else str(step)}})
