"""GET /metrics in Prometheus text format.

Two kinds of figures. Counters and histograms are kept in process by the code that sees
the thing happen (a webhook answered, a task run): an increment or an observation, no IO.
Under gunicorn each worker process has its own; with PROMETHEUS_MULTIPROC_DIR set (as
gunicorn.conf.py and ./run.sh do) every process, the worker included, writes its values
to files there and a scrape adds them up (prometheus_client's multiprocess mode).
Gauges about shared state (queue depth, oldest waiting task, replay progress, last event
position) are read from the database at scrape time, so every web process agrees.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import psycopg
from flask import Blueprint, Response, abort, current_app, request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool

from service.auth import key_matches
from service.db import queries
from service.errors import ServiceError

logger = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

WEBHOOKS_RECEIVED = Counter("rjs_webhooks_received", "Webhook deliveries received (every outcome).")
WEBHOOKS_RECORDED = Counter("rjs_webhooks_recorded", "Webhook deliveries recorded as a new event.")
WEBHOOKS_DUPLICATE = Counter("rjs_webhooks_duplicate",
                             "Webhook deliveries whose webhook-id was already recorded (answered 200).")
WEBHOOKS_REJECTED = Counter("rjs_webhooks_rejected", "Webhook deliveries refused, by reason.", ["reason"])
WEBHOOK_ACK_SECONDS = Histogram("rjs_webhook_ack_seconds",
                                "Time from reading a webhook to its 200 (verify, record, fold).",
                                buckets=_FAST)
WEBHOOK_GROUP_SIZE = Histogram("rjs_webhook_group_size",
                               "Webhooks recorded together in one transaction (group commit).",
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
# Where a webhook's time goes, stage by stage (service/webhooks.py, `Stages`): queue (waiting
# for a gunicorn thread), dispatch (the thread parsing the request to the handler starting),
# verify (reading the body, the signature, the JSON), group_wait (waiting for the group
# ahead to commit), database (its own group's statement and commit), wake (the group
# committed to this thread running again), respond (the log line, metrics, the response
# written to the socket).
WEBHOOK_STAGES = ("queue", "dispatch", "verify", "group_wait", "database", "wake", "respond")
WEBHOOK_STAGE_SECONDS = Histogram(
    "rjs_webhook_stage_seconds", "Time a webhook answered 200 spent in each stage of its request, by stage.",
    ["stage"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
_STAGE_CHILDREN = {stage: WEBHOOK_STAGE_SECONDS.labels(stage) for stage in WEBHOOK_STAGES}


def observe_stages(seconds: dict[str, float]) -> None:
    for stage, value in seconds.items():
        _STAGE_CHILDREN[stage].observe(value)


RATE_LIMITED = Counter("rjs_rate_limited", "Requests refused 429 by the rate limit, by surface.", ["surface"])
TASKS = Counter("rjs_tasks", "Queue tasks run by the worker, by kind and outcome.", ["kind", "outcome"])
TASK_SECONDS = Histogram("rjs_task_seconds", "Time a worker spent running one task, by kind.", ["kind"],
                         buckets=_SLOW)
RECONCILER_ACTIONS = Counter("rjs_reconciler_actions",
                             "What the reconciler did: polled, unchanged, poll_failed, resubmitted, "
                             "stalled, stalled_unexplained.",
                             ["action"])
STALLED_JOBS = Counter("rjs_stalled_jobs",
                       "Unfinished jobs the reconciler found with nothing running or queued (a lost task "
                       "or a bug), by outcome: ended (it recorded the failures that end them) or "
                       "unexplained (nothing to record; found again at every pass).", ["outcome"])


class MetricsUnauthorized(ServiceError):
    """Send Authorization: Bearer <METRICS_TOKEN>."""

    code = "unauthorized"
    status = 401


def rate_limited(surface: str) -> None:
    RATE_LIMITED.labels(surface).inc()
    if surface == "webhooks":
        WEBHOOKS_RECEIVED.inc()
        WEBHOOKS_REJECTED.labels("rate_limited").inc()


class DatabaseCollector(Collector):
    """Gauges read from the database when scraped."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("rjs_database_up", "Whether the scrape could read the database.")
        try:
            with self.pool.connection(timeout=5) as conn:
                families = list(_queue(conn)) + list(_replay(conn)) + list(_events(conn))
        except (psycopg.Error, OSError) as exc:
            logger.warning("metrics: database unreadable: %s", exc, extra={"action": "metrics"})
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families


def _queue(conn: psycopg.Connection) -> Iterator[Metric]:
    depth = GaugeMetricFamily("rjs_queue_depth", "Tasks queued or running, by kind and status.",
                              labels=["kind", "status"])
    oldest = GaugeMetricFamily("rjs_queue_oldest_ready_seconds",
                               "How long the oldest task ready to run has waited, by kind (0: none).",
                               labels=["kind"])
    for row in conn.execute(queries["metrics_queue"]).fetchall():
        depth.add_metric([row["kind"], row["status"]], row["n"])
        if row["status"] == "queued":
            oldest.add_metric([row["kind"]], float(row["oldest_ready_seconds"] or 0))
    yield depth
    yield oldest


def _replay(conn: psycopg.Connection) -> Iterator[Metric]:
    """A replay names its phase in application_name (service/replay.py), so any scrape sees it."""
    running = GaugeMetricFamily("rjs_replay_running", "Replays running now.")
    phase = GaugeMetricFamily("rjs_replay_phase", "Stage of a running replay (1..stages), by scope.",
                              labels=["scope", "stage", "stages"])
    seconds = GaugeMetricFamily("rjs_replay_seconds", "How long the running replay has taken so far.",
                                labels=["scope"])
    rows = conn.execute(queries["metrics_replay"]).fetchall()
    running.add_metric([], len(rows))
    for row in rows:
        _, scope, number, stages, stage = (row["application_name"].split(":") + [""] * 5)[:5]
        phase.add_metric([scope, stage, stages], float(number or 0))
        seconds.add_metric([scope], float(row["seconds"] or 0))
    yield from (running, phase, seconds)


def _events(conn: psycopg.Connection) -> Iterator[Metric]:
    last = GaugeMetricFamily("rjs_events_last_position", "Position of the newest event.")
    last.add_metric([], conn.execute(queries["newest_position"]).fetchone()["position"])
    yield last


def exposition(pool: ConnectionPool) -> bytes:
    """Everything, in the text format: process metrics (added up across processes in
    multiprocess mode) and the database gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    database = CollectorRegistry(auto_describe=False)
    database.register(DatabaseCollector(pool))
    return generate_latest(registry) + generate_latest(database)


@bp.before_request
def _guard() -> None:
    """METRICS_TOKEN, when set, is required; without it /metrics is off (404, like any unknown
    path) on an address others can reach, unless ALLOW_OPEN_METRICS (service/exposure.py)."""
    cfg = current_app.config
    if cfg.get("METRICS_TOKEN"):
        if not key_matches(request.headers, (cfg["METRICS_TOKEN"],)):
            raise MetricsUnauthorized()
    elif current_app.extensions.get("public_bind") and not cfg.get("ALLOW_OPEN_METRICS"):
        abort(404)


@bp.after_request
def _challenge(response: Response) -> Response:
    if response.status_code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


@bp.get("/metrics")
def metrics() -> Response:
    return Response(exposition(current_app.extensions["db_pool"]), mimetype=None, content_type=CONTENT_TYPE)
