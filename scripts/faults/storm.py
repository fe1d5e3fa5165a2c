"""Webhook storm: --webhooks signed deliveries for --jobs jobs, --duplicates of them
redeliveries of an id already in the storm, all in random order, sent as fast as gunicorn
on loopback answers them over --connections keep-alive connections.

    .venv/bin/python scripts/faults/storm.py [--webhooks 10000] [--jobs 1000] [--duplicates 0.3]

Afterwards: the events table holds exactly one replicate.webhook event per unique webhook id;
every delivery was answered 200 (recorded once, duplicate otherwise); the projections equal a
rebuild from the events (replay --check); and they equal the projections of a second database
that recorded the same webhooks once each in lifecycle order, through the same append_webhook
function (the in-order replay), apart from the recording times and positions.

Bodies are the real Replicate payloads of scripts/bench/ingest.py (starting, processing, more
logs, succeeded | failed | canceled) with fresh prediction ids; each job has 1-3 predictions,
recorded first (job.created, prediction.submitted); the number of intermediate webhooks is
adjusted so the unique ids are exactly (1 - duplicates) x webhooks. Scratch databases are made
on DATABASE_URL's server when set, else on an embedded PostgreSQL, and dropped afterwards.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import secrets
import sys
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "scripts" / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import ingest  # noqa: E402  (scripts/bench/ingest.py)
from common import default_database_url, scratch_database, server, with_database  # noqa: E402

from scripts.faults.compare import differences, projection  # noqa: E402
from scripts.faults.sender import Sent, send_all  # noqa: E402
from service import db  # noqa: E402
from service.replay import replay  # noqa: E402


@dataclass
class Prediction:
    job: str
    index: int
    pid: str
    names: list[str]                       # template names in lifecycle order


@dataclass
class Storm:
    plan: ingest.Plan                      # setup events (job.created, prediction.submitted)
    in_order: list[ingest.Webhook] = field(default_factory=list)   # unique, lifecycle order
    deliveries: list[ingest.Webhook] = field(default_factory=list)  # with duplicates, shuffled


def make_storm(jobs: int, total: int, duplicates: float, seed: int) -> Storm:
    rng, workload = random.Random(seed), ingest.Workload(seed)
    plan, predictions = ingest.Plan(), []
    for _ in range(jobs):
        predictions += _job(rng, workload, plan)
    _fit(predictions, round(total * (1 - duplicates)), rng)
    storm = Storm(plan)
    for n, (query, body) in enumerate(w for p in predictions for w in _webhooks(p, workload)):
        storm.in_order.append(ingest.Webhook(f"msg_storm_{workload.tag}_{n}", query, body))
    storm.deliveries = storm.in_order + rng.choices(storm.in_order, k=total - len(storm.in_order))
    rng.shuffle(storm.deliveries)
    return storm


def _job(rng: random.Random, workload: ingest.Workload, plan: ingest.Plan) -> list[Prediction]:
    job, count = str(uuid.UUID(int=rng.getrandbits(128), version=4)), rng.randint(1, 3)
    plan.jobs += 1
    plan.setup.append((f"created:{job}", job, "job.created", {
        "model": workload.starting["model"], "version": workload.starting["version"],
        "input": {"prompt": rng.choice(ingest.PROMPTS)}, "aspect_ratio": "1:1", "count": count}))
    made = []
    for index in range(count):
        pid = workload.prediction_id()
        created = json.loads(workload.texts["starting"].replace("{PID}", pid))
        plan.setup.append((f"submitted:{job}:1:{index}", job, "prediction.submitted",
                           {"step": 1, "index": index, "prediction": created}))
        names = rng.choices([n for _, n in ingest.LIFECYCLES], weights=[s for s, _ in ingest.LIFECYCLES])[0]
        made.append(Prediction(job, index, pid, list(names)))
        plan.predictions += 1
    return made


def _fit(predictions: list[Prediction], unique: int, rng: random.Random) -> None:
    """Drop or add intermediate (processing, logs) webhooks until there are `unique` in all."""
    n = sum(len(p.names) for p in predictions)
    for _ in range(10 * len(predictions) + abs(n - unique)):
        if n == unique:
            return
        p = rng.choice(predictions)
        if n > unique and len(p.names) > 2:
            del p.names[1]
            n -= 1
        elif n < unique and p.names[-1] != "canceled":
            p.names.insert(-1, "more_logs")
            n += 1
    raise ValueError(f"cannot make {unique} unique webhooks from {len(predictions)} predictions")


def _webhooks(p: Prediction, workload: ingest.Workload) -> list[tuple[str, bytes]]:
    query = f"?job={p.job}&step=1&index={p.index}"
    return [(query, workload.texts[name].replace("{PID}", p.pid).encode()) for name in p.names]


def record_in_order(url: str, storm: Storm) -> None:
    """The in-order replay: each unique webhook once, in lifecycle order, through append_webhook."""
    ingest.record_setup(url, storm.plan)
    with db.connect(url, autocommit=True) as conn:
        for w in storm.in_order:
            job, step, index = (part.split("=")[1] for part in w.query.lstrip("?").split("&"))
            metadata = {"source": "replicate", "query": {"job": job, "step": step, "index": index}}
            conn.execute("SELECT * FROM append_webhook(%s, %s, %s::jsonb, %s::jsonb)",
                         (w.webhook_id, job, w.body.decode(), json.dumps(metadata)))


@dataclass
class Outcome:
    sent: Sent
    answers: Counter
    events: int
    unique_ids: int
    missing: int
    replay_differences: int
    in_order_differences: list[str]
    cpu_seconds: tuple[float, float, float]   # gunicorn, PostgreSQL backends, this sender
    load_before: float                        # the machine's 1-minute load average at the start

    @property
    def ok(self) -> bool:
        return (self.events == self.unique_ids and not self.missing and not self.replay_differences
                and not self.in_order_differences and set(self.answers) <= {"200 recorded", "200 duplicate"})


def run_storm(storm: Storm, url: str, reference_url: str, connections: int, tmp: Path,
              quiet_logs: bool = False) -> Outcome:
    load_before = os.getloadavg()[0]
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    ingest.record_setup(url, storm.plan)
    env = {"DATABASE_URL": url, "REPLICATE_WEBHOOK_SECRET": secret, "REPLICATE_API_TOKEN": "storm",
           **({"LOG_LEVEL": "WARNING"} if quiet_logs else {})}
    with ingest.gunicorn("wsgi:app", env, tmp / "gunicorn.log", quiet_logs) as (port, master):
        requests = ingest.signed_requests(storm.deliveries, secret, port)
        with ingest.CpuMeter(master, with_database(url, "postgres"), urlsplit(url).path.lstrip("/")) as cpu:
            sent = send_all(requests, port, connections)
    answers = Counter(_answer(status, body) for status, body in sent.answers)
    unique = {w.webhook_id for w in storm.in_order}
    with db.connect(url) as conn:
        keys = [r["event_key"] for r in conn.execute(
            "SELECT event_key FROM events WHERE type = 'replicate.webhook'")]
        replayed = replay(conn, check=True).differences
    record_in_order(reference_url, storm)
    return Outcome(sent, answers, len(keys), len(unique), len(unique - set(keys)), replayed,
                   differences(projection(url), projection(reference_url)),
                   (cpu.gunicorn_seconds, cpu.postgres_seconds, sent.client_cpu_seconds), load_before)


def _answer(status: int, body: bytes) -> str:
    """'200 recorded', '200 duplicate', or the status and the error's code."""
    try:
        return f"{status} {json.loads(body).get('status') or json.loads(body).get('error')}"
    except (ValueError, AttributeError):
        return f"{status} (not JSON)"


def report(storm: Storm, outcome: Outcome, connections: int) -> str:
    s, total = outcome.sent, len(storm.deliveries)
    lines = [
        f"storm: {total:,} signed webhooks, {len(storm.in_order):,} unique ids and "
        f"{total - len(storm.in_order):,} redeliveries, for {storm.plan.jobs:,} jobs "
        f"({storm.plan.predictions:,} predictions), in random order",
        f"sent: {connections} connections to gunicorn ({ingest.gunicorn_settings()}): {s.seconds:.1f} s, "
        f"{total / s.seconds:,.0f} webhooks/s, p50 {s.percentile(50):.1f} ms, p99 {s.percentile(99):.1f} ms, "
        f"reconnects {s.reconnects}",
        "CPU per webhook: " + ", ".join(f"{name} {seconds / total * 1e6:,.0f} us" for name, seconds in zip(
            ("gunicorn", "PostgreSQL", "sender"), outcome.cpu_seconds, strict=True))
        + f" ({sum(outcome.cpu_seconds) / s.seconds:.2f} of {os.cpu_count()} cores busy; load average before "
        f"the run {outcome.load_before:.1f})",
        "answers: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(outcome.answers.items())),
        f"events: {outcome.events:,} replicate.webhook events for {outcome.unique_ids:,} unique ids; "
        f"missing {outcome.missing}",
        f"replay --check: {outcome.replay_differences} differences",
        f"in-order replay (same webhooks once each, lifecycle order, second database): "
        f"{len(outcome.in_order_differences)} differing rows" +
        (f", e.g. {outcome.in_order_differences[:3]}" if outcome.in_order_differences else ""),
        "result: " + ("all checks passed" if outcome.ok else "FAILED"),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--webhooks", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=1_000)
    parser.add_argument("--duplicates", type=float, default=0.3, help="share of deliveries that repeat an id")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--quiet-logs", action="store_true", help="LOG_LEVEL=WARNING, no access log")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--database-url", default=default_database_url())
    args = parser.parse_args()
    storm = make_storm(args.jobs, args.webhooks, args.duplicates, args.seed)
    with server(args.database_url) as (server_url, where), tempfile.TemporaryDirectory(
            prefix="storm-") as tmp:
        print(f"server: {where}", flush=True)
        with scratch_database(server_url, f"storm_{os.getpid()}") as url, \
                scratch_database(server_url, f"storm_in_order_{os.getpid()}") as reference:
            outcome = run_storm(storm, url, reference, args.connections, Path(tmp), args.quiet_logs)
        print(report(storm, outcome, args.connections), flush=True)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
