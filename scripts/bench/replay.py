"""Benchmark `flask --app service replay` on generated events, against a plain scan of them.

    .venv/bin/python scripts/bench/replay.py [--events 1000000]

Creates a scratch database (on DATABASE_URL's server if set, else on an embedded
pgserver in a temp dir), fills `events` directly with set-based SQL (the rebuild reads
only events), runs the real replay (service.replay.replay, which commits since the
projections start empty), times `select sum(length(data::text)) from events` as the
baseline, prints both and the per-phase breakdown, and what writing the rebuilt rows alone
costs (the floor of any in-place replay); then replays once more over the
projection it built (what a replay on a live service costs: the snapshot and the
row-by-row comparison; it writes nothing), and drops the database.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

from common import PROMPTS, add_database_url, scratch_database, server, server_version, templates
from psycopg.types.json import Jsonb

from service import db
from service.replay import PHASES, STAGES, TABLES, ReplayResult, Step, replay

GENERATE_SQL = (Path(__file__).with_name("generate_events.sql")).read_text()
SCAN_SQL = "SELECT sum(length(data::text)) FROM events"
TEMPLATE_PROMPT = "A chariot pulled by a team of six rainbow unicorns"
EVENTS_PER_JOB = 5.1  # see generate_events.sql: (4 + 3 + 18 * 5 + 5) / 20
GOAL_EVENTS_PER_SECOND = 100_000
GOAL_SCAN_RATIO = 4.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events to generate")
    parser.add_argument("--chunk-jobs", type=int, default=10_000, help="jobs generated per statement")
    parser.add_argument("--scans", type=int, default=3, help="times to run the scan baseline")
    add_database_url(parser)
    return parser.parse_args()


def generate(url: str, events: int, chunk_jobs: int) -> None:
    """Insert `events` events, chunk by chunk, printing progress."""
    bodies = templates()
    params = {name: Jsonb(body) for name, body in bodies.items()}
    params |= {"prompts": PROMPTS, "template_prompt": TEMPLATE_PROMPT}
    started, written, lo = time.perf_counter(), 0, 0
    with db.connect(url, autocommit=True) as conn:
        while written < events:
            jobs = min(chunk_jobs, math.ceil((events - written) / EVENTS_PER_JOB) + 1)
            chunk = {"lo": lo, "hi": lo + jobs, "max_rows": events - written}
            written += conn.execute(GENERATE_SQL, params | chunk).rowcount
            lo += jobs
            elapsed = time.perf_counter() - started
            print(f"  generated {written:>10,} / {events:,} events, {lo:,} jobs "
                  f"({elapsed:.1f} s, {written / elapsed:,.0f} events/s)", flush=True)
        started = time.perf_counter()
        conn.execute("VACUUM (ANALYZE) events")
        print(f"  vacuum analyze: {time.perf_counter() - started:.1f} s", flush=True)


def describe(url: str) -> None:
    with db.connect(url) as conn:
        row = conn.execute("""
            SELECT count(*) AS events, count(DISTINCT stream) AS jobs,
                   avg(octet_length(data::text))::integer AS avg_text,
                   avg(pg_column_size(data))::integer AS avg_stored,
                   pg_size_pretty(pg_total_relation_size('events')) AS size
            FROM events""").fetchone()
        types = conn.execute("""
            SELECT type, count(*) AS n, min(octet_length(data::text)) AS low,
                   max(octet_length(data::text)) AS high
            FROM events GROUP BY 1 ORDER BY 2 DESC""").fetchall()
    print(f"events: {row['events']:,} in {row['jobs']:,} jobs; body {row['avg_text']:,} B as text, "
          f"{row['avg_stored']:,} B stored on average; table with indexes {row['size']}")
    for t in types:
        print(f"  {t['type']:<22} {t['n']:>10,}  body {t['low']:,}-{t['high']:,} B")


def scan_seconds(url: str) -> float:
    with db.connect(url) as conn:
        started = time.perf_counter()
        conn.execute(SCAN_SQL).fetchone()
        return time.perf_counter() - started


def run_replay(url: str) -> ReplayResult:
    started = time.perf_counter()

    def progress(step: Step) -> None:
        print(f"  [{step.number}/{len(STAGES)}] {step.stage}: {step.rows:,} rows "
              f"({time.perf_counter() - started:.1f} s so far, {step.rate:,.0f} events/s, "
              f"about {step.left:.0f} s left)", flush=True)

    with db.connect(url) as conn:
        return replay(conn, progress=progress)


def report(result: ReplayResult, scans: list[float]) -> None:
    scan = min(scans)
    ratio = result.seconds / scan
    print()
    rate = result.events_per_second
    print(f"replay:  {result.events:,} events in {result.seconds:.2f} s = {rate:,.0f} events/s "
          f"(goal >= {GOAL_EVENTS_PER_SECOND:,}: {'met' if rate >= GOAL_EVENTS_PER_SECOND else 'NOT met'})")
    print(f"         {result.jobs:,} jobs, {result.predictions:,} predictions, "
          f"{result.differences:,} rows differed, committed={result.committed}")
    print(f"scan:    {SCAN_SQL}: best {scan:.2f} s = {result.events / scan:,.0f} events/s "
          f"(runs: {', '.join(f'{s:.2f}' for s in scans)}; median {statistics.median(scans):.2f} s)")
    print(f"ratio:   replay / scan = {ratio:.2f} "
          f"(goal <= {GOAL_SCAN_RATIO:.0f}: {'met' if ratio <= GOAL_SCAN_RATIO else 'NOT met'})")
    print("phases:")
    for name, seconds in result.timings.items():
        print(f"  {name:<12} {seconds:8.2f} s {100 * seconds / result.seconds:5.1f} %")
    overhead = sum(v for k, v in result.timings.items() if k not in PHASES)
    print(f"  {'(outside the three rebuild phases)':<12} {overhead:.2f} s "
          f"{100 * overhead / result.seconds:.1f} %")
    print(f"cut-over: {result.cut_over_ms:.0f} ms (the only time appends waited), "
          f"{result.differences:,} rows written")


def check_projection(url: str) -> None:
    """A glance that the rebuild produced what the workload implies."""
    with db.connect(url) as conn:
        rows = conn.execute("SELECT status, count(*) AS n FROM jobs GROUP BY 1 ORDER BY 2 DESC").fetchall()
        outputs = conn.execute("SELECT count(*) AS n FROM outputs").fetchone()["n"]
    print("jobs by status: " + ", ".join(f"{r['status']} {r['n']:,}" for r in rows)
          + f"; outputs {outputs:,}")


def write_floor(url: str) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds to write the rows the replay just built, and nothing else, two ways, each in a
    transaction rolled back. In place: each projection table's rows copied into an empty
    table made LIKE it (same columns, checks, indexes and compression; logged, as the
    projections are): a replay that writes the projections in place cannot take less,
    however cheap its fold. Fresh: the rows into tables without indexes, then the same
    indexes built (what a rebuild into new tables swapped in at commit would write; the
    project does not do that: views, grants, triggers and Supabase's publication are bound
    to the tables)."""
    in_place, fresh = {}, {}
    with db.connect(url) as conn, conn.transaction(force_rollback=True):
        for table in TABLES:  # every table a replay rebuilds
            conn.execute(f"CREATE TABLE floor_{table} (LIKE {table} INCLUDING ALL)")
            started = time.perf_counter()
            conn.execute(f"INSERT INTO floor_{table} SELECT * FROM {table}")
            in_place[table] = time.perf_counter() - started
        for table in TABLES:  # every table a replay rebuilds
            conn.execute(f"CREATE TABLE fresh_{table} (LIKE {table} INCLUDING DEFAULTS "
                         "INCLUDING CONSTRAINTS INCLUDING COMPRESSION INCLUDING STORAGE)")
            indexes = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s",
                                   (table,)).fetchall()
            started = time.perf_counter()
            conn.execute(f"INSERT INTO fresh_{table} SELECT * FROM {table}")
            for index in indexes:  # CREATE [UNIQUE] INDEX name ON schema.table USING …
                name, definition = index["indexname"], index["indexdef"]
                conn.execute(definition.replace(f"INDEX {name} ON ", f"INDEX fresh_{name} ON ")
                             .replace(f".{table} USING ", f".fresh_{table} USING "))
            fresh[table] = time.perf_counter() - started
    return in_place, fresh


def report_floor(floors: tuple[dict[str, float], dict[str, float]], result: ReplayResult,
                 scan: float) -> None:
    for name, seconds in zip(("in place", "fresh tables, indexes after"), floors, strict=True):
        total = sum(seconds.values())
        print(f"floor:   writing the rebuilt rows alone, {name}: {total:.2f} s = {total / scan:.2f} x "
              f"the scan, {100 * total / result.seconds:.0f} % of the replay ("
              + ", ".join(f"{t} {s:.2f} s" for t, s in seconds.items()) + ")")


def main() -> None:
    args = parse_args()
    with server(args.database_url) as (server_url, where):
        print(f"server: {where}, PostgreSQL {server_version(server_url)}")
        with scratch_database(server_url, f"bench_replay_{os.getpid()}") as url:
            print(f"generating {args.events:,} events (~{args.events / EVENTS_PER_JOB:,.0f} jobs)")
            generate(url, args.events, args.chunk_jobs)
            describe(url)
            scans = [scan_seconds(url) for _ in range(max(1, args.scans - 1))]
            print(f"scan baseline: {', '.join(f'{s:.2f} s' for s in scans)}", flush=True)
            print("replaying")
            result = run_replay(url)
            scans.append(scan_seconds(url))  # once more after, in case the machine got busier
            report(result, scans)
            report_floor(write_floor(url), result, min(scans))
            check_projection(url)
            print("replaying again, over the projection just built (as a replay on a live "
                  "service runs: snapshot and compare every row; nothing differs, nothing is written)")
            again = run_replay(url)
            scan = min(scans)
            print(f"replay over a live projection: {again.seconds:.2f} s = {again.events_per_second:,.0f} "
                  f"events/s, {again.seconds / scan:.2f} x the scan ({scan:.2f} s), "
                  f"{again.differences:,} rows differed, committed={again.committed}; "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in again.timings.items()))
        print("scratch database dropped")


if __name__ == "__main__":
    main()
