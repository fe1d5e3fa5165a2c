"""Webhooks during a full replay: acknowledgement times at a steady rate, without and with a replay.

    .venv/bin/python scripts/bench/replay_ingest.py [--events 1000000] [--rate 300] [--baseline 20]

Creates a scratch database (on DATABASE_URL's server if set, else on an embedded pgserver),
fills it with --events generated events (as scripts/bench/replay.py does) and builds the
live projection from them with a first replay. Then it starts the service under gunicorn
(`gunicorn -c gunicorn.conf.py wsgi:app`) and sends signed webhooks at a steady --rate,
open loop: each request has its time in the schedule, and its acknowledgement time is
measured from that time, so a stall that holds requests back counts in full. First for
--baseline seconds with nothing else running, then for as long as a full replay over the
live projection runs (service.replay.replay, as `flask --app service replay` runs it).
The webhooks are those of scripts/bench/ingest.py (real payloads, lifecycles, 80% of
predictions in jobs created before the run, 20% orphans).

Prints p50, p99 and the longest acknowledgement in both runs, the ratio of the p99s (goal:
<= 2), the longest single wait (goal: <= 250 ms), the replay's stages and its cut-over, and
checks that every webhook acknowledged with a 2xx is in `events` exactly once (0 lost) and
that the projection then equals a rebuild.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import itertools
import os
import secrets
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import add_database_url, scratch_database, server, server_version
from ingest import Webhook, Workload, gunicorn, record_setup
from replay import generate

from service import db
from service.replay import ReplayResult, Step, replay

GOAL_P99_RATIO = 2.0
GOAL_LONGEST_MS = 250


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the store")
    parser.add_argument("--rate", type=int, default=300, help="webhooks per second")
    parser.add_argument("--baseline", type=int, default=20, help="seconds of webhooks with no replay")
    parser.add_argument("--senders", type=int, default=32, help="sending threads (connections)")
    parser.add_argument("--differ", type=int, default=1000,
                        help="jobs rows made wrong before the replay, so that its cut-over has rows "
                             "to write while webhooks wait for it")
    parser.add_argument("--seed", type=int, default=20261206)
    add_database_url(parser)
    return parser.parse_args()


@dataclass
class Run:
    """One stretch of the schedule: each webhook's acknowledgement time and status."""

    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)

    def line(self) -> str:
        ms = sorted(1000 * x for x in self.latencies)
        p99 = ms[max(0, int(len(ms) * 0.99) - 1)]
        bad = sum(1 for s in self.statuses if not 200 <= s < 300)
        return (f"{len(ms):,} webhooks, p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, "
                f"longest {ms[-1]:.1f} ms, {bad} not acknowledged")

    def p99(self) -> float:
        ms = sorted(self.latencies)
        return ms[max(0, int(len(ms) * 0.99) - 1)]


class Sender:
    """Sends the planned webhooks at a fixed rate from a pool of keep-alive connections."""

    def __init__(self, port: int, secret: str, webhooks: list[Webhook], rate: int, senders: int) -> None:
        self.port, self.rate, self.senders = port, rate, senders
        self.key = base64.b64decode(secret.removeprefix("whsec_"))
        self.webhooks = iter(webhooks)
        self.lock = threading.Lock()

    def run(self, until: threading.Event | None = None, seconds: float | None = None) -> Run:
        run, start, counter = Run(), time.monotonic() + 0.05, itertools.count()
        deadline = start + seconds if seconds else None
        threads = [threading.Thread(target=self._send, args=(run, start, counter, until, deadline))
                   for _ in range(self.senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return run

    def _send(self, run: Run, start: float, counter, until, deadline) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while True:
            with self.lock:
                at = start + next(counter) / self.rate
                webhook = next(self.webhooks)
            if (deadline and at >= deadline) or (until is not None and until.is_set()):
                break
            time.sleep(max(0.0, at - time.monotonic()))
            status = self._post(conn, webhook)
            with self.lock:
                run.latencies.append(time.monotonic() - at)
                run.statuses.append(status)
                if 200 <= status < 300:
                    run.acknowledged.append(webhook.webhook_id)
        conn.close()

    def _post(self, conn: http.client.HTTPConnection, w: Webhook) -> int:
        ts = str(int(time.time()))
        mac = hmac.new(self.key, f"{w.webhook_id}.{ts}.".encode() + w.body, hashlib.sha256).digest()
        conn.request("POST", f"/webhooks/replicate{w.query}", body=w.body, headers={
            "Content-Type": "application/json", "webhook-id": w.webhook_id, "webhook-timestamp": ts,
            "webhook-signature": f"v1,{base64.b64encode(mac).decode()}"})
        response = conn.getresponse()
        response.read()
        return response.status


def replay_in_background(url: str) -> tuple[threading.Thread, threading.Event, dict]:
    done, out = threading.Event(), {}

    def progress(step: Step) -> None:
        print(f"    replay [{step.number}] {step.stage}: {step.rows:,} rows, {step.seconds:.1f} s",
              flush=True)

    def work() -> None:
        try:
            with db.connect(url) as conn:
                out["result"] = replay(conn, progress=progress)
        finally:
            done.set()
    thread = threading.Thread(target=work)
    thread.start()
    return thread, done, out


def check(url: str, runs: list[Run]) -> None:
    acknowledged = [w for r in runs for w in r.acknowledged]
    with db.connect(url) as conn:
        found = conn.execute("SELECT count(*) AS n FROM events WHERE event_key = ANY (%s)",
                             (acknowledged,)).fetchone()["n"]
        differences = replay(conn, check=True).differences
    print(f"store:   {len(acknowledged):,} webhooks acknowledged, {found:,} of them in events "
          f"({len(acknowledged) - found:,} lost; event keys are unique, so none twice); "
          f"the projection {'equals a rebuild' if differences == 0 else f'differs in {differences:,} rows'}")


def report(base: Run, during: Run, result: ReplayResult) -> None:
    ratio = during.p99() / base.p99()
    longest = 1000 * max(during.latencies)
    print(f"without: {base.line()}")
    print(f"during:  {during.line()}")
    met = "met" if longest <= GOAL_LONGEST_MS else "NOT met"
    print(f"p99 during / without: {ratio:.2f} (goal <= {GOAL_P99_RATIO:g}: "
          f"{'met' if ratio <= GOAL_P99_RATIO else 'NOT met'}); longest wait during the replay "
          f"{longest:.0f} ms (goal <= {GOAL_LONGEST_MS}: {met})")
    print(f"replay:  {result.events:,} events ({result.caught_up:,} recorded while it ran) in "
          f"{result.seconds:.1f} s = {result.events_per_second:,.0f} events/s; cut-over "
          f"{result.cut_over_ms:.0f} ms, {result.differences:,} rows written; "
          + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))


def main() -> None:
    args = parse_args()
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    with server(args.database_url) as (server_url, where), tempfile.TemporaryDirectory(
            prefix="bench-replay-ingest-") as tmp:
        print(f"server: {where}, PostgreSQL {server_version(server_url)}; load {os.getloadavg()}")
        with scratch_database(server_url, f"bench_replay_ingest_{os.getpid()}") as url:
            generate(url, args.events, 10_000)
            print("building the live projection (a first replay)", flush=True)
            with db.connect(url) as conn:
                replay(conn)
                conn.execute("UPDATE jobs SET outputs_processed = outputs_processed + 1 "
                             "WHERE id IN (SELECT id FROM jobs ORDER BY id LIMIT %s)", (args.differ,))
                conn.commit()
            plan = Workload(args.seed).plan(args.rate * (args.baseline + 600))
            record_setup(url, plan)
            env = {"DATABASE_URL": url, "REPLICATE_WEBHOOK_SECRET": secret}
            with gunicorn("wsgi:app", env, Path(tmp) / "service.log", False) as (port, _):
                sender = Sender(port, secret, plan.webhooks, args.rate, args.senders)
                sender.run(seconds=3)  # warm-up
                print(f"webhooks at {args.rate}/s for {args.baseline} s, no replay", flush=True)
                base = sender.run(seconds=args.baseline)
                print(f"webhooks at {args.rate}/s during a full replay", flush=True)
                thread, done, out = replay_in_background(url)
                during = sender.run(until=done)
                thread.join()
            report(base, during, out["result"])
            check(url, [base, during])
        print("scratch database dropped")


if __name__ == "__main__":
    main()
