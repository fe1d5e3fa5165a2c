"""The process_output task: download an output promptly (Replicate deletes it an hour
after the prediction finishes), resize or upscale it by the job's aspect ratio, store
the original and the result, and record output.processed — exactly once per output."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from service import downloads, events, imaging, queue, storage
from service.db import queries
from service.queue import Task
from service.worker import Context

logger = logging.getLogger(__name__)


class ProcessOutput:
    def run(self, ctx: Context, task: Task) -> None:
        p = task.payload
        with ctx.pool.connection() as conn:
            job = conn.execute(queries["job_by_id"], {"id": task.job_id}).fetchone()
        if job is None or job["status"] == "canceled":
            with ctx.pool.connection() as conn:
                queue.complete(conn, task, ctx.worker)
            return
        timings: dict[str, int] = {}
        with _timed(timings, "download_ms"):
            fetched = downloads.fetch(p["source_url"], downloads.DownloadPolicy.from_config(ctx.config))
        with _timed(timings, "process_ms"):
            result = imaging.process(fetched.data, job["postprocess"], job["aspect_ratio"],
                                     imaging.ImagingSettings.from_config(ctx.config))
            width, height = imaging.probe(result.data)[1:]
        with _timed(timings, "store_ms"):
            original, processed = _store(ctx, task, fetched, result)
        record = {"prediction_id": p["prediction_id"], "index": p["index"], "source_url": p["source_url"],
                  "url": processed.url, "original_url": original.url, "width": width, "height": height,
                  "bytes": processed.bytes, "original_bytes": original.bytes, "format": result.format,
                  "plan": dataclasses.asdict(result.plan), "timings": timings}
        with ctx.pool.connection() as conn:
            events.append(conn, key=f"processed:{p['prediction_id']}:{p['index']}", stream=task.job_id,
                          type="output.processed", data=record,
                          metadata={"source": "worker", "task_id": task.id, "attempt": task.attempts})
            queue.complete(conn, task, ctx.worker)

    def give_up(self, ctx: Context, task: Task, reason: str, final: bool) -> None:
        p = task.payload
        with ctx.pool.connection() as conn:
            events.append(conn, key=f"failed:{p['prediction_id']}:{p['index']}", stream=task.job_id,
                          type="output.failed",
                          data={"prediction_id": p["prediction_id"], "index": p["index"],
                                "source_url": loggable_url(p["source_url"]), "error": reason,
                                "attempts": task.attempts},
                          metadata={"source": "worker", "task_id": task.id})
            queue.fail(conn, task, ctx.worker, reason)


def _store(ctx: Context, task: Task, fetched: downloads.Downloaded,
           result: imaging.Processed) -> tuple[storage.StoredFile, storage.StoredFile]:
    store = ctx.clients["storage"]
    p = task.payload
    media_type = imaging.MEDIA_TYPES[result.format]
    original = store.put(storage.object_path(task.job_id, p["prediction_id"], p["index"], fetched.extension,
                                             original=True), fetched.data, fetched.image_type)
    processed = store.put(storage.object_path(task.job_id, p["prediction_id"], p["index"],
                                              downloads.IMAGE_EXTENSIONS[media_type]),
                          result.data, media_type)
    return original, processed


def loggable_url(url: str) -> str:
    """A data: URI can be megabytes; keep its header only."""
    return url.split(",", 1)[0] + ",…" if url.startswith("data:") else url


@contextmanager
def _timed(into: dict[str, int], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    into[name] = round((time.perf_counter() - started) * 1000)
