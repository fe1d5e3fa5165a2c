"""Benchmark the live write path (service.events.append) against bare inserts of the same rows.

    .venv/bin/python scripts/bench/append.py [--seconds 20 | --count N] [--threads 8] [--rounds 4]

Creates a scratch database (on DATABASE_URL's server if set, else on an embedded
pgserver in a temp dir). Phase 1: THREADS connections, autocommit, each append its own
transaction: append_event records the event and folds it into the projections. The rows
are jobs as the service sees them (job.created, prediction.submitted, Replicate's
webhooks with bodies made from the real payloads, output.processed), interleaved as
concurrent jobs are, with ~10% of keys delivered twice. Phase 2: the same rows as bare
INSERTs into a plain table with the events table's columns (no indexes, no fold), one row
per transaction, on as many connections. Phase 3: the same rows recorded alone, into a
copy of the events table (its keys, indexes and checks; ON CONFLICT on the key), without the
fold: the ceiling of the ratio. The phases alternate in rounds over the same rows. Prints
the rates and the ratios; then, on one connection, the PostgreSQL CPU per row of appending,
of bare-inserting and of recording alone 3,000 fresh rows (a figure that other load on the
machine moves less than throughput); then drops the database.
"""

from __future__ import annotations

import argparse
import copy
import heapq
import itertools
import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from common import (
    PROMPTS,
    RECORDED_TABLE,
    add_database_url,
    backend_cpu_seconds,
    scratch_database,
    server,
    server_version,
    templates,
)
from psycopg.types.json import Jsonb

from service import db, events

GOAL_RATIO = 0.5
DUPLICATE_SHARE = 0.11  # of events delivered a second time: ~10% of all appends
JOB_INTERVAL = 0.4  # seconds between job starts, as in the replay benchmark
BARE_TABLE = """
    CREATE TABLE bare_events (LIKE events INCLUDING DEFAULTS INCLUDING IDENTITY)"""
BARE_INSERT = """
    INSERT INTO bare_events (event_key, stream, type, data, metadata)
    VALUES (%(key)s, %(stream)s, %(type)s, %(data)s, %(metadata)s)"""
# The durable part of an append without the fold: the event into recorded_events (common.py),
# idempotent by key. Whatever the fold costs, an append costs at least this, so
# recorded/bare is the ceiling of the ratio.
RECORDED_INSERT = """
    INSERT INTO recorded_events (event_key, stream, type, data, metadata)
    VALUES (%(key)s, %(stream)s, %(type)s, %(data)s, %(metadata)s)
    ON CONFLICT (event_key) DO NOTHING"""


@dataclass(frozen=True)
class Row:
    key: str
    stream: str
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    rows: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="how long the append phase runs (default 20)")
    parser.add_argument("--count", type=int, help="append exactly this many rows instead")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternate append and bare phases this many times (default 4)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    add_database_url(parser)
    return parser.parse_args()


def _logs(template: dict[str, Any], seed: int, prompt: str) -> str:
    return (template["logs"].replace("seed: 7117", f"seed: {seed}")
            .replace("A chariot pulled by a team of six rainbow unicorns", prompt))


def _prediction(template: dict[str, Any], job: str, pid: str, i: int, **fields: Any) -> dict[str, Any]:
    body = copy.deepcopy(template)
    body.update(id=pid, input={"prompt": PROMPTS[i % len(PROMPTS)], "seed": i * 7919 % 100_000,
                               "width": 1024, "height": 1024},
                urls={"cancel": f"https://api.replicate.com/v1/predictions/{pid}/cancel",
                      "get": f"https://api.replicate.com/v1/predictions/{pid}"},
                webhook=f"https://jobs.example.com/webhooks/replicate?job={job}&step=1", **fields)
    return body


def job_rows(i: int, bodies: dict[str, dict[str, Any]], seed: int) -> list[tuple[float, Row]]:
    """Job i's events with their delay after the job starts (see generate_events.sql)."""
    ids = random.Random(f"{seed}:{i}")
    job, pid = str(uuid.UUID(int=ids.getrandbits(128))), f"{ids.getrandbits(128):032x}"[:26]
    outcome = {0: "failed", 1: "canceled"}.get(i % 20, "succeeded")
    created = {"model": "stability-ai/sdxl", "aspect_ratio": "1:1", "count": 1,
               "input": {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i * 7919 % 100_000}}
    submitted = {"step": 1, "index": 0, "prediction": _prediction(bodies["starting"], job, pid, i)}
    out = [(0.0, Row(f"created:{job}", job, "job.created", created)),
           (0.2, Row(f"submitted:{job}:1:0", job, "prediction.submitted", submitted))]
    out += _webhooks(i, job, pid, outcome, bodies)
    if outcome == "succeeded":
        out.append((17.0, Row(f"processed:{pid}:0", job, "output.processed", {
            "prediction_id": pid, "index": 0, "source_url": _output_url(pid),
            "url": f"https://example.supabase.co/storage/v1/object/public/outputs/{job}/{pid}-0.webp",
            "width": 1024, "height": 1024, "bytes": 900_000 + i * 31 % 400_000})))
    return out


def _output_url(pid: str) -> str:
    return f"https://replicate.delivery/pbxt/{pid}/out-0.png"


def _webhooks(i: int, job: str, pid: str, outcome: str,
              bodies: dict[str, dict[str, Any]]) -> list[tuple[float, Row]]:
    """Replicate's webhooks for the prediction: logs as they grow, then how it ended."""
    names = [] if outcome == "canceled" else [("processing", 5.0)]
    names += [("more_logs", 9.0)] if outcome == "succeeded" and i % 4 == 2 else []
    names += [(outcome, 14.0)]
    query, out = {"query": {"job": job, "step": "1"}}, []
    for n, (name, delay) in enumerate(names):
        extra: dict[str, Any] = {}
        if name in ("processing", "more_logs", "succeeded"):
            extra["logs"] = _logs(bodies[name], i * 7919 % 100_000, PROMPTS[i % len(PROMPTS)])
        if name == "succeeded":
            extra["output"] = [_output_url(pid)]
        out.append((delay, Row(f"msg_{pid}_{n}", job, "replicate.webhook",
                               _prediction(bodies[name], job, pid, i, **extra), query)))
    return out


def workload(seed: int) -> Iterator[Row]:
    """Rows in arrival order: jobs start JOB_INTERVAL apart, their events interleave, and
    a share of them is delivered again up to 30 s later under the same key."""
    rng, bodies = random.Random(seed), templates()
    pending: list[tuple[float, int, Row]] = []
    order, job, start = itertools.count(), 0, 0.0
    while True:
        while not pending or start <= pending[0][0]:
            for delay, row in job_rows(job, bodies, seed):
                heapq.heappush(pending, (start + delay, next(order), row))
                if rng.random() < DUPLICATE_SHARE:
                    heapq.heappush(pending, (start + delay + rng.uniform(0.5, 30), next(order), row))
            job, start = job + 1, start + JOB_INTERVAL
        yield heapq.heappop(pending)[2]


def drive(url: str, threads: int, rows: Iterator[Row], deadline: float | None,
          call: Callable[[psycopg.Connection, Row], bool]) -> Run:
    """Feed rows to `call` from `threads` connections until rows run out or the deadline."""
    run, lock = Run(), threading.Lock()

    def worker() -> None:
        with db.connect(url, autocommit=True) as conn:
            while deadline is None or time.perf_counter() < deadline:
                with lock:
                    row = next(rows, None)
                if row is None:
                    return
                began = time.perf_counter()
                try:
                    duplicate = call(conn, row)
                except psycopg.Error as exc:
                    run.errors.append(f"{row.key}: {exc}")
                    continue
                run.latencies.append(time.perf_counter() - began)
                run.rows += 1
                run.duplicates += duplicate

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    started = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    run.seconds = time.perf_counter() - started
    return run


def append_row(conn: psycopg.Connection, row: Row) -> bool:
    return events.append(conn, key=row.key, stream=row.stream, type=row.type, data=row.data,
                         metadata=row.metadata).duplicate


def _insert(statement: str, conn: psycopg.Connection, row: Row) -> bool:
    """Insert the row with `statement`; True when the key was already there (nothing written)."""
    cur = conn.execute(statement, {"key": row.key, "stream": row.stream, "type": row.type,
                                   "data": Jsonb(row.data), "metadata": Jsonb(row.metadata)})
    return cur.rowcount == 0


def bare_row(conn: psycopg.Connection, row: Row) -> bool:
    return _insert(BARE_INSERT, conn, row)


def recorded_row(conn: psycopg.Connection, row: Row) -> bool:
    return _insert(RECORDED_INSERT, conn, row)


def describe(name: str, run: Run) -> None:
    lat = sorted(run.latencies) or [0.0]
    print(f"{name}: {run.rows:,} rows in {run.seconds:.2f} s = {run.rate:,.0f} /s; "
          f"latency p50 {1000 * statistics.median(lat):.1f} ms, "
          f"p95 {1000 * lat[int(0.95 * (len(lat) - 1))]:.1f} ms"
          + (f"; {run.duplicates:,} duplicates ({100 * run.duplicates / max(run.rows, 1):.1f} %)"
             if run.duplicates else "")
          + (f"; {len(run.errors)} ERRORS, first: {run.errors[0]}" if run.errors else ""), flush=True)


def check_projection(url: str) -> None:
    with db.connect(url) as conn:
        row = conn.execute("""
            SELECT (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM jobs) AS jobs,
                   (SELECT count(*) FROM predictions) AS predictions,
                   (SELECT count(*) FROM outputs) AS outputs""").fetchone()
    print(f"  recorded {row['events']:,} events; projections: {row['jobs']:,} jobs, "
          f"{row['predictions']:,} predictions, {row['outputs']:,} outputs")


def recorded(rows: Iterator[Row], into: list[Row]) -> Iterator[Row]:
    """The rows, each also kept in `into` as it is taken, so the bare phase gets the same ones."""
    for row in rows:
        into.append(row)
        yield row


def merge(total: Run, part: Run) -> None:
    total.rows += part.rows
    total.duplicates += part.duplicates
    total.errors += part.errors
    total.latencies += part.latencies
    total.seconds += part.seconds


def rounds(url: str, args: argparse.Namespace) -> tuple[Run, Run, Run]:
    """Alternate append, bare and recorded-alone phases over the same rows, so that a shared,
    noisy machine slows them alike; return the totals."""
    source, appended, bare, alone = workload(args.seed), Run(), Run(), Run()
    for n in range(1, args.rounds + 1):
        taken: list[Row] = []
        limit = args.count // args.rounds if args.count else None
        deadline = None if limit else time.perf_counter() + args.seconds / args.rounds
        part = drive(url, args.threads, recorded(itertools.islice(source, limit), taken),
                     deadline, append_row)
        same = taken[: part.rows + len(part.errors)]
        plain = drive(url, args.threads, iter(same), None, bare_row)
        only = drive(url, args.threads, iter(same), None, recorded_row)
        print(f"  round {n}: append {part.rate:,.0f} /s, bare {plain.rate:,.0f} /s, "
              f"event alone {only.rate:,.0f} /s; ratio {part.rate / plain.rate if plain.rate else 0:.2f}",
              flush=True)
        for total, run in ((appended, part), (bare, plain), (alone, only)):
            merge(total, run)
    return appended, bare, alone


def backend_cpu(url: str, rows: list[Row], write: Callable[[psycopg.Connection, Row], bool]) -> float:
    """PostgreSQL CPU seconds per row that one connection's backend spends writing `rows`
    one transaction each: steadier than throughput when other work shares the machine."""
    with db.connect(url, autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
        before = backend_cpu_seconds(pid)
        for row in rows:
            write(conn, row)
        return (backend_cpu_seconds(pid) - before) / len(rows)


def cpu_per_row(url: str, seed: int, count: int = 3000) -> None:
    """The same rows appended, inserted bare and recorded alone, on one connection: backend
    CPU per row."""
    rows = list(itertools.islice(workload(seed + 1), count))
    appended, bare = backend_cpu(url, rows, append_row), backend_cpu(url, rows, bare_row)
    alone = backend_cpu(url, rows, recorded_row)
    print(f"PostgreSQL CPU per row, one connection, {count:,} rows: append {appended * 1e6:,.0f} us, "
          f"bare {bare * 1e6:,.0f} us (bare / append = {bare / appended:.2f}), "
          f"event alone {alone * 1e6:,.0f} us (bare / alone = {bare / alone:.2f})")


def main() -> None:
    args = parse_args()
    with server(args.database_url) as (server_url, where):
        print(f"server: {where}, PostgreSQL {server_version(server_url)}; {args.threads} connections")
        with scratch_database(server_url, f"bench_append_{os.getpid()}") as url:
            with db.connect(url, autocommit=True) as conn:
                conn.execute(BARE_TABLE)
                conn.execute(RECORDED_TABLE)
            appended, bare, alone = rounds(url, args)
            describe("append (append_event, fold included)", appended)
            check_projection(url)
            describe("bare INSERT (plain table, no fold)  ", bare)
            describe("event alone (events' keys, no fold)  ", alone)
            ratio = appended.rate / bare.rate if bare.rate else 0.0
            print(f"ratio: append / bare = {ratio:.2f} "
                  f"(goal >= {GOAL_RATIO}: {'met' if ratio >= GOAL_RATIO else 'NOT met'})")
            if bare.rate:
                print(f"ceiling: event alone / bare = {alone.rate / bare.rate:.2f} (what append / bare "
                      "would be if the fold cost nothing)")
            cpu_per_row(url, args.seed)
        print("scratch database dropped")


if __name__ == "__main__":
    main()
