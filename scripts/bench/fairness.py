"""The fair queue against today's FIFO claim, in one run (issue 20).

1. Order. The whole service over real HTTP (Flask on a port, one worker thread, the local
   Replicate simulator): owner A creates one job of 50 predictions; once 3 of A's are
   created, owner B creates one of 2. Run with the fair claim (sql/queue.sql, claim_task)
   and with FIFO (the claim before issue 20, kept below and installed in that run's scratch
   database in its place), at two creation limits:
     * 600 a minute (Replicate's default): the simulator's limit and the service's pacing;
     * 6 a minute, burst 1 (an account with less than $5 of credit): the simulator allows
       one create per 10 s window, the service paces just under it (5.7 a minute; at exactly
       6 a create can arrive a hair early and take a 429); --scale N divides that wall-clock
       minute by N (window 10/N s, pacing 5.7*N a minute), so the order of the
       creates is the one a real minute gives, only sooner. Replicate's 429 for a create
       that comes early makes the client wait retry_after (whole seconds, at least 1).
   Printed: how many creates after B's job was recorded until B's last prediction was
   created (goal <= 4); where A's last create came among all 52 and when A's batch was
   all created and done, from A's job being recorded (goal: FIFO plus B's two creates).
2. Claim cost. 10,000 queued submissions across 1,000 owners (1,000 jobs of 10, each
   owned by one user, created through the service's own create_job), in one database:
   time per claim of the fair claim (with no owner limits, and with OWNER_MAX_RUNNING=2
   and OWNER_RATE_LIMIT_PER_MINUTE=60) and of the FIFO claim, each claim rolled back so
   every claim sees 10,000 queued; the three interleaved in rounds (goal: fair <= 2x FIFO).

  flock /work/notes/bench.lock .venv/bin/python scripts/bench/fairness.py [--scale 20]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from scripts.bench.common import add_database_url, scratch_database, server, server_version  # noqa: E402
from scripts.replicate_sim import Faults, start_simulator  # noqa: E402
from service import commands, create_app, db  # noqa: E402
from service.cli import handlers, worker_context  # noqa: E402
from service.worker import Worker  # noqa: E402

OWNER_A = "6f1c3a0e-1d2b-4c5d-8e9f-0a1b2c3d4e5f"
OWNER_B = "0b7e6d5c-4a39-4281-9f0e-1d2c3b4a5968"
SPEC = {"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse on a cliff at dusk"},
        "postprocess": {"mode": "none"}}

# The claim as it was before the fair queue: the oldest ready task. Same signature as
# today's, so the worker calls it unchanged; the owner limits are ignored.
FIFO_CLAIM = """
CREATE OR REPLACE FUNCTION {name}(p_worker text, p_lease_seconds integer, p_kinds text[],
                                  p_owner_max_running integer DEFAULT NULL,
                                  p_owner_per_minute integer DEFAULT NULL,
                                  p_hold_seconds integer DEFAULT 30)
RETURNS SETOF tasks
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    SELECT id INTO v_id FROM tasks
    WHERE status = 'running' AND lease_until < now() AND kind = ANY (p_kinds)
    ORDER BY lease_until LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF v_id IS NULL THEN
        SELECT id INTO v_id FROM tasks
        WHERE status = 'queued' AND run_after <= now() AND kind = ANY (p_kinds)
        ORDER BY run_after, id LIMIT 1 FOR UPDATE SKIP LOCKED;
    END IF;
    IF v_id IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE tasks SET status = 'running', attempts = attempts + 1, locked_by = p_worker,
                     lease_until = now() + make_interval(secs => p_lease_seconds), updated_at = now()
    WHERE id = v_id
    RETURNING *;
END $$;
"""


@dataclass
class Order:
    b_last: int          # creates after B's job was recorded until B's last was created
    a_last_index: int    # A's last create among all creates (1-based)
    a_created_s: float   # A's job recorded -> A's last prediction created
    a_done_s: float      # A's job recorded -> A's job completed
    b_done_s: float      # B's job recorded -> B's job completed


@contextmanager
def service(url: str, per_minute: float, faults: Faults, speed: float):
    sim = start_simulator(speed=speed, faults=faults)
    app = create_app({"DATABASE_URL": url, "REPLICATE_API_BASE_URL": sim.api_url,
                      "REPLICATE_API_TOKEN": "bench-token", "REPLICATE_WEBHOOK_SECRET": None,
                      "OUTPUT_ALLOWED_HOSTS": "127.0.0.1", "LOG_LEVEL": "WARNING",
                      "REPLICATE_RATE_LIMIT_PER_MINUTE": per_minute, "RATE_LIMIT_PER_MINUTE": 0,
                      "STORAGE_DIR": str(ROOT / ".data" / "bench-fairness")})
    http = make_server("127.0.0.1", 0, app, threaded=True)
    base = f"http://127.0.0.1:{http.server_port}"
    app.config["PUBLIC_BASE_URL"] = base
    threading.Thread(target=http.serve_forever, daemon=True).start()
    ctx = worker_context(app)
    stop = threading.Event()
    worker = threading.Thread(target=Worker(ctx, handlers(), poll_seconds=0.2).run_forever, args=(stop,),
                              daemon=True)
    worker.start()
    try:
        yield base, sim
    finally:
        stop.set()
        worker.join(30)
        http.shutdown()
        sim.stop()
        ctx.clients["replicate"].close()
        app.extensions["db_pool"].close()


def post_job(base: str, owner: str, count: int) -> str:
    response = requests.post(f"{base}/api/jobs", json={**SPEC, "count": count, "owner": owner}, timeout=30)
    response.raise_for_status()
    return response.json()["id"]


def wait(what: str, check, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def scenario(server_url: str, name: str, fifo: bool, per_minute: float, faults: Faults,
             speed: float) -> Order:
    with scratch_database(server_url, name) as url, db.connect(url, autocommit=True) as conn:
        if fifo:
            conn.execute(FIFO_CLAIM.format(name="claim_task"))

        def submitted(job: str) -> int:
            return conn.execute("SELECT count(*) AS n FROM events WHERE stream = %s "
                                "AND type = 'prediction.submitted'", (job,)).fetchone()["n"]

        def status(job: str) -> str:
            return conn.execute("SELECT status FROM jobs WHERE id = %s", (job,)).fetchone()["status"]

        with service(url, per_minute, faults, speed) as (base, _sim):
            a = post_job(base, OWNER_A, 50)
            wait("A's first 3 creates", lambda: submitted(a) >= 3, 120)
            b = post_job(base, OWNER_B, 2)
            limit = 50 * 60 / per_minute * 3 + 120
            wait("both jobs to finish", lambda: status(a) == status(b) == "completed", limit)
        rows = conn.execute("""
            SELECT stream, type, position, recorded_at FROM events
            WHERE type IN ('job.created', 'prediction.submitted') ORDER BY position""").fetchall()
        jobs = {r["id"]: r for r in conn.execute("SELECT id::text, created_at, completed_at FROM jobs")}
    creates = [r for r in rows if r["type"] == "prediction.submitted"]
    b_recorded = next(r["position"] for r in rows if r["type"] == "job.created" and r["stream"] == b)
    after = [r["stream"] for r in creates if r["position"] > b_recorded]
    a_created = next(r["recorded_at"] for r in rows if r["type"] == "job.created" and r["stream"] == a)
    b_created = next(r["recorded_at"] for r in rows if r["type"] == "job.created" and r["stream"] == b)
    a_creates = [r for r in creates if r["stream"] == a]
    return Order(
        b_last=max(i for i, s in enumerate(after) if s == b) + 1,
        a_last_index=creates.index(a_creates[-1]) + 1,
        a_created_s=(a_creates[-1]["recorded_at"] - a_created).total_seconds(),
        a_done_s=(jobs[a]["completed_at"] - a_created).total_seconds(),
        b_done_s=(jobs[b]["completed_at"] - b_created).total_seconds())


def claim_cost(server_url: str, rounds: int, per_round: int) -> dict[str, list[float]]:
    with (scratch_database(server_url, "bench_fairness_claim") as url,
          db.connect(url, autocommit=True) as conn):
        conn.execute(FIFO_CLAIM.format(name="claim_task_fifo"))
        started = time.perf_counter()
        with conn.transaction():
            for n in range(1000):
                commands.create_job(conn, {**SPEC, "count": 10}, owner_id=str(uuid.UUID(int=n + 1)))
        print(f"  queued 10,000 submissions of 1,000 owners in {time.perf_counter() - started:.1f} s")
        conn.execute("VACUUM ANALYZE tasks")
        counts = conn.execute("SELECT count(*) AS n, count(DISTINCT owner_key) AS owners FROM tasks "
                              "WHERE status = 'queued'").fetchone()
        assert counts == {"n": 10_000, "owners": 1_000}, counts
        claims = {
            "fifo": "SELECT id FROM claim_task_fifo('bench', 60, '{submit_prediction}')",
            "fair": "SELECT id FROM claim_task('bench', 60, '{submit_prediction}')",
            "fair+limits": "SELECT id FROM claim_task('bench', 60, '{submit_prediction}', 2, 60)",
        }
        times: dict[str, list[float]] = {k: [] for k in claims}
        for _ in range(rounds):
            for name, sql in claims.items():
                for _ in range(per_round):
                    conn.execute("BEGIN")
                    t0 = time.perf_counter()
                    conn.execute(sql).fetchone()
                    times[name].append(time.perf_counter() - t0)
                    conn.execute("ROLLBACK")
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_database_url(parser)
    parser.add_argument("--scale", type=float, default=20.0,
                        help="the 6-a-minute limit's minute is this many times shorter (default 20)")
    parser.add_argument("--speed", type=float, default=20.0, help="the simulator's speed (default 20)")
    parser.add_argument("--rounds", type=int, default=10, help="claim-cost rounds (default 10)")
    parser.add_argument("--per-round", type=int, default=200, help="claims per round and kind (default 200)")
    parser.add_argument("--skip-order", action="store_true", help="only the claim cost")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

    with server(args.database_url) as (server_url, where):
        print(f"PostgreSQL {server_version(server_url)} ({where})")
        if not args.skip_order:
            limits = {
                "600/min": (600.0, Faults(rate_limit_per_minute=600)),
                f"6/min (minute / {args.scale:g})": (
                    6.0 * args.scale * 0.95, Faults(enabled=frozenset({"ratelimit"}), rate_limit=1,
                                             rate_window=10.0 / args.scale)),
            }
            print("\n1. A creates 50, then (after 3 of A's are created) B creates 2")
            print(f"{'limit':<22} {'claim':<5} {'B last after B':>14} {'A last of 52':>12} "
                  f"{'A created s':>11} {'A done s':>9} {'B done s':>9}")
            for label, (per_minute, faults) in limits.items():
                for mode in ("fifo", "fair"):
                    o = scenario(server_url, f"bench_fairness_{mode}", mode == "fifo", per_minute, faults,
                                 args.speed)
                    print(f"{label:<22} {mode:<5} {o.b_last:>14} {o.a_last_index:>12} "
                          f"{o.a_created_s:>11.2f} {o.a_done_s:>9.2f} {o.b_done_s:>9.2f}", flush=True)
        print("\n2. One claim with 10,000 queued submissions across 1,000 owners (rolled back each time)")
        times = claim_cost(server_url, args.rounds, args.per_round)
        fifo = statistics.median(times["fifo"])
        for name, samples in times.items():
            median = statistics.median(samples)
            p95 = statistics.quantiles(samples, n=20)[-1]
            print(f"  {name:<12} median {median * 1000:.3f} ms  p95 {p95 * 1000:.3f} ms  "
                  f"({median / fifo:.2f}x FIFO)  n={len(samples)}")


if __name__ == "__main__":
    main()
