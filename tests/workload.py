"""Build realistic event sequences from the real Replicate payloads in tests/fixtures/replicate."""

from __future__ import annotations

import copy
import random
from datetime import datetime, timedelta
from typing import Any

from service import events
from tests.conftest import payload

LIFECYCLE = [  # one SDXL prediction as Replicate reports it, in order
    "starting_sdxl_create_response",
    "processing_sdxl_partial_logs",
    "processing_sdxl_more_logs",
    "succeeded_sdxl_polled_list_output",
]
FAILED = ["starting_sdxl_create_response", "failed_flux11pro_nsfw_with_traceback_logs"]
CANCELED = ["starting_sdxl_create_response", "canceled_sdxl_after_start"]

# What a webhook's event keeps of its body (docs/sql.md, "The delivery log"); the logs are
# kept up to their last LOGS_KEPT characters, with their whole length beside them when cut.
WEBHOOK_FACTS = frozenset({"id", "status", "error", "metrics", "output", "model", "version",
                           "data_removed", "created_at", "started_at", "completed_at", "logs"})
LOGS_KEPT = 4000


def facts(body: dict[str, Any]) -> dict[str, Any]:
    """The event data a webhook with this body is recorded as."""
    kept = {k: v for k, v in body.items() if k in WEBHOOK_FACTS}
    logs = body.get("logs")
    if isinstance(logs, str) and len(logs) > LOGS_KEPT:
        kept.update(logs=logs[-LOGS_KEPT:], logs_length=len(logs))
    return kept


def bodies(names: list[str], prediction_id: str) -> list[dict[str, Any]]:
    """The payloads, re-keyed to one prediction id, as successive states of it."""
    out = []
    for name in names:
        body = copy.deepcopy(payload(name))
        body["id"] = prediction_id
        out.append(body)
    return out


def create_job(conn, job_id: str, count: int = 1, **fields: Any) -> events.Appended:
    data = {"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse"},
            "aspect_ratio": "1:1", "count": count, **fields}
    return events.append(conn, key=f"created:{job_id}", stream=job_id, type="job.created", data=data)


def webhook(conn, job_id: str | None, body: dict, key: str, step: int = 1) -> events.Appended:
    metadata = {"source": "test", "query": {"job": job_id, "step": str(step)} if job_id else {}}
    return events.append(conn, key=key, stream=job_id or body["id"], type="replicate.webhook",
                         data=body, metadata=metadata)


def deliveries(states: list[dict], rng: random.Random, duplicates: int = 2) -> list[tuple[str, dict]]:
    """Each state delivered 1..duplicates+1 times under one webhook id, shuffled."""
    out = [(f"msg_{s['id']}_{i}", s) for i, s in enumerate(states)
           for _ in range(rng.randint(1, duplicates + 1))]
    rng.shuffle(out)
    return out


def prediction_row(conn, prediction_id: str) -> dict:
    """The projection row, without the columns that record arrival (positions, times)."""
    row = conn.execute("SELECT * FROM predictions WHERE id = %s", (prediction_id,)).fetchone()
    drop = {"state_key", "logs_key", "output_key", "first_seen_at", "updated_at", "event_count"}
    return {k: v for k, v in row.items() if k not in drop}


def timed(body: dict, base: datetime, *, started: float | None = None,
          completed: float | None = None, predict_time: float | None = None) -> dict:
    """The body with Replicate's timestamps moved to `base` plus the given seconds
    (None clears them) and, when given, metrics.predict_time replaced."""
    out = copy.deepcopy(body)
    out["created_at"] = base.isoformat()
    out["started_at"] = None if started is None else (base + timedelta(seconds=started)).isoformat()
    out["completed_at"] = None if completed is None else (base + timedelta(seconds=completed)).isoformat()
    if predict_time is not None:
        out["metrics"] = {**(out.get("metrics") or {}), "predict_time": predict_time}
    return out


def job_created_at(conn, job_id: str) -> datetime:
    """When the database recorded the job (its job.created event)."""
    return conn.execute("SELECT created_at FROM jobs WHERE id = %s", (job_id,)).fetchone()["created_at"]


def submit(conn, job_id: str, body: dict, step: int = 1, n: int = 1) -> events.Appended:
    """The service's record of creating a prediction (body: Replicate's create response)."""
    return events.append(conn, key=f"submitted:{job_id}:{step}:{n}", stream=job_id,
                         type="prediction.submitted", data={"step": step, "prediction": body})


def polled(conn, job_id: str, body: dict, key: str) -> events.Appended:
    """What the reconciler learned by asking Replicate about a prediction."""
    return events.append(conn, key=key, stream=job_id, type="replicate.polled", data=body,
                         metadata={"source": "test"})


def process_output(conn, job_id: str, prediction_id: str, index: int, width: int = 1024,
                   height: int = 1024, size: int = 1_572_864, url: str | None = None) -> events.Appended:
    """The worker's record of one output downloaded, resized and stored."""
    data = {"prediction_id": prediction_id, "index": index, "width": width, "height": height,
            "bytes": size, "source_url": f"https://replicate.delivery/{prediction_id}/out-{index}.png",
            "url": url or f"file:///outputs/{prediction_id}/{index}.png"}
    return events.append(conn, key=f"processed:{prediction_id}:{index}", stream=job_id,
                         type="output.processed", data=data)


def cancel_job(conn, job_id: str, reason: str | None = None) -> events.Appended:
    data = {"reason": reason} if reason else {}
    return events.append(conn, key=f"canceled:{job_id}", stream=job_id, type="job.canceled", data=data)
