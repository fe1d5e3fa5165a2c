"""The worker process: claims tasks from the queue and runs them; runs the reconciler.

`flask --app service worker` runs one; run several for more throughput. A task's handler
does its slow work (a Replicate call, a download) outside any transaction, then records
its event and finishes the task in one transaction. A task that fails transiently is
retried with backoff; on its last attempt, or on a permanent failure, its handler gives
up and records why. A worker killed mid-task loses nothing: the lease runs out and another
worker claims the task again, and the event keys keep the result recorded once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg_pool import ConnectionPool

from service import logs, metrics, queue
from service.queue import Task

logger = logging.getLogger(__name__)


@dataclass
class Context:
    """What a handler may use: the pool, its worker's name, settings, outside clients."""

    pool: ConnectionPool
    worker: str
    config: Mapping[str, Any]
    clients: dict[str, Any] = field(default_factory=dict)


class Handler(Protocol):
    def run(self, ctx: Context, task: Task) -> None: ...

    def give_up(self, ctx: Context, task: Task, reason: str, final: bool) -> None: ...


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"


class Worker:
    def __init__(self, ctx: Context, handlers: Mapping[str, Handler], *, lease_seconds: int = 300,
                 poll_seconds: float = 5.0, periodic: Callable[[], object] | None = None,
                 periodic_every: float = 60.0) -> None:
        self.ctx, self.handlers = ctx, dict(handlers)
        self.lease_seconds, self.poll_seconds = lease_seconds, poll_seconds
        self.periodic, self.periodic_every = periodic, periodic_every
        self._next_periodic = 0.0
        self._can_listen = False

    def run_once(self) -> bool:
        """Claim and run one task; False when there was none ready."""
        with self.ctx.pool.connection() as conn:
            task = queue.claim(conn, self.ctx.worker, self.lease_seconds, tuple(self.handlers),
                               queue.OwnerLimits.from_config(self.ctx.config))
        if task is None:
            return False
        with self._lease_kept(task):
            self._run(task)
        return True

    def run_forever(self, stop: threading.Event) -> None:
        logger.info("worker started", extra={"action": "worker_start", "worker": self.ctx.worker,
                                             "kinds": ",".join(self.handlers)})
        listener = self._listen()
        self._can_listen = listener is not None
        while not stop.is_set():
            self._maybe_periodic()
            try:
                if self.run_once():
                    continue
            except psycopg.OperationalError as exc:  # the database restarted: wait and go on
                logger.warning("database unavailable: %s", exc, extra={"action": "worker_db_error"})
            if self._can_listen and (listener is None or listener.closed):
                listener = self._listen()  # a restart closed it: without it, every task waits a poll
            self._wait(listener, stop)
        logger.info("worker stopped", extra={"action": "worker_stop", "worker": self.ctx.worker})

    def _run(self, task: Task) -> None:
        handler = self.handlers[task.kind]
        extra = {"action": "task", "task_id": task.id, "task_kind": task.kind, "job_id": task.job_id,
                 "attempt": task.attempts}
        started = time.perf_counter()
        # Every line logged while the task runs (downloads, storage, events) names its job
        # and prediction, whichever module logs it.
        with logs.bound(job_id=task.job_id, prediction_id=task.payload.get("prediction_id"),
                        task_id=task.id, task_kind=task.kind):
            try:
                handler.run(self.ctx, task)
            except Exception as exc:  # every failure is either retried or given up on, and logged
                outcome = self._failed(handler, task, exc, extra)
            else:
                outcome = "done"
                logger.info("task done", extra=extra | {"ms": round((time.perf_counter() - started) * 1000)})
        metrics.TASKS.labels(task.kind, outcome).inc()
        metrics.TASK_SECONDS.labels(task.kind).observe(time.perf_counter() - started)

    def _failed(self, handler: Handler, task: Task, exc: Exception, extra: dict) -> str:
        """Retry the task later or give up on it; which one it was."""
        transient = getattr(exc, "transient", True)
        reason = f"{type(exc).__name__}: {exc}"
        if transient and not task.last_attempt:
            delay = queue.backoff(task.attempts)
            logger.warning("task failed, retrying in %.1f s: %s", delay, reason, extra=extra,
                           exc_info=not hasattr(exc, "transient"))
            with self.ctx.pool.connection() as conn:
                queue.retry(conn, task, self.ctx.worker, reason, delay)
            return "retried"
        logger.error("task given up: %s", reason, extra=extra | {"final": not transient})
        handler.give_up(self.ctx, task, reason, final=not transient)
        return "given_up"

    def _lease_kept(self, task: Task) -> _LeaseKeeper:
        return _LeaseKeeper(self.ctx, task, self.lease_seconds)

    def _maybe_periodic(self) -> None:
        if self.periodic is None or time.monotonic() < self._next_periodic:
            return
        self._next_periodic = time.monotonic() + self.periodic_every
        try:
            self.periodic()
        except Exception:  # the reconciler failing must not stop the worker
            logger.exception("periodic work failed", extra={"action": "periodic"})

    def _listen(self) -> psycopg.Connection | None:
        """LISTEN for new tasks; None (poll only) where that is impossible, e.g. behind a
        transaction-mode pooler."""
        try:
            conn = psycopg.connect(self.ctx.config["DATABASE_URL"], autocommit=True)
            conn.execute("LISTEN tasks")
            return conn
        except psycopg.Error as exc:
            logger.info("no LISTEN (%s); polling every %s s", exc, self.poll_seconds,
                        extra={"action": "worker_listen"})
            return None

    def _wait(self, listener: psycopg.Connection | None, stop: threading.Event) -> None:
        if listener is None or listener.closed:
            # poll where LISTEN is impossible; where a restart broke it, listen again soon
            stop.wait(min(self.poll_seconds, 1.0) if self._can_listen else self.poll_seconds)
            return
        try:
            for _ in listener.notifies(timeout=self.poll_seconds, stop_after=1):
                pass
        except psycopg.Error:  # the connection broke: back to the loop, which listens again
            listener.close()


class _LeaseKeeper:
    """Extends a task's lease while its handler runs, so a long task is not taken over."""

    def __init__(self, ctx: Context, task: Task, lease_seconds: int) -> None:
        self.ctx, self.task, self.lease_seconds = ctx, task, lease_seconds
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._keep, daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _keep(self) -> None:
        while not self._done.wait(self.lease_seconds / 3):
            try:
                with self.ctx.pool.connection() as conn:
                    queue.extend(conn, self.task, self.ctx.worker, self.lease_seconds)
            except psycopg.Error:
                logger.warning("could not extend a lease", extra={"action": "lease",
                                                                   "task_id": self.task.id})
