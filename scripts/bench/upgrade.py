"""The in-place upgrade to the partitioned store: `migrate` over today's unpartitioned events.

    .venv/bin/python scripts/bench/upgrade.py [--events 1000000] [--database-url URL]

Builds a store of --events generated events (real payload mix, generate_events.sql) with
the SQL of --baseline-commit (today's layout, from git), replays it so the projections are
there, then runs the current migrate (017 rebuilds events as partitions and fills event_keys,
018 adds the delivery log) and prints how long it took per million events. One second into
it, a webhook is appended from another connection: how long it waited says whether webhooks
wait during the upgrade. Checks the events and projections are unchanged (counts and a
checksum of every row) and that the key table holds every event's key.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from common import add_database_url, scratch_database, server, server_version, templates
from psycopg.types.json import Jsonb
from scale import baseline_sql, full_replay, generate

from service import db, migrations

# every row of a table, as JSON, in order, without the columns migrations since add (021:
# jobs.deadline, predictions.superseded); the webhook sent during the upgrade left out
CHECKSUM = ("SELECT count(*) AS n, md5(string_agg("
            "md5((to_jsonb(t) - '{{deadline,superseded}}'::text[])::text), '' ORDER BY {order})) AS sum "
            "FROM {table} t WHERE to_jsonb(t) ->> 'event_key' IS DISTINCT FROM 'msg_during_upgrade'")
TABLES = {"events": "position", "jobs": "id", "predictions": "id", "outputs": "prediction_id, index",
          "job_activity": "job_id"}


def snapshot(conn) -> dict:
    return {t: conn.execute(CHECKSUM.format(table=t, order=o)).fetchone() for t, o in TABLES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--baseline-commit", default="6504d9f")
    add_database_url(parser)
    args = parser.parse_args()
    with server(args.database_url) as (server_url, where), tempfile.TemporaryDirectory() as tmp:
        print(f"server: {where}, PostgreSQL {server_version(server_url)}", flush=True)
        old_sql = baseline_sql(args.baseline_commit, Path(tmp))
        with scratch_database(server_url, "bench_upgrade", old_sql) as url:
            generate(url, args.events, partitioned=False)
            full_replay(url)
            with db.connect(url, autocommit=True) as conn:
                before = snapshot(conn)
            job = None  # an orphan: it adds a predictions row, and changes no job
            waited = {}

            def webhook() -> None:
                time.sleep(1)
                with db.connect(url, autocommit=True) as conn:
                    t0 = time.perf_counter()
                    for attempt in (1, 2):  # as Replicate retries a webhook answered with an error
                        try:
                            conn.execute("SELECT * FROM append_webhook('msg_during_upgrade', %s, %s, '{}')",
                                         (job, Jsonb(templates()["processing"])))
                            break
                        except psycopg.Error as exc:
                            waited["error"] = f"attempt {attempt} failed: {str(exc).splitlines()[0]}"
                    waited["s"] = time.perf_counter() - t0

            during = threading.Thread(target=webhook)
            during.start()
            with db.connect(url, autocommit=True) as conn:
                t0 = time.perf_counter()
                applied = migrations.migrate(conn)
                seconds = time.perf_counter() - t0
            during.join()
            with db.connect(url, autocommit=True) as conn:
                after = snapshot(conn)
                keys = conn.execute("SELECT count(*) AS n FROM events e JOIN event_keys k ON "
                                    "k.event_key = e.event_key AND k.position = e.position").fetchone()
                added = conn.execute("SELECT position FROM events "
                                     "WHERE event_key = 'msg_during_upgrade'").fetchone()
            print(f"applied: {', '.join(applied)}")
            print(f"migrate: {seconds:.1f} s for {before['events']['n']:,} events = "
                  f"{seconds / before['events']['n'] * 1e6:.1f} s per million events")
            print(f"a webhook sent 1 s into it waited {waited['s']:.1f} s "
                  f"(recorded at position {added['position']:,}); {waited.get('error', 'no error')}")
            print(f"every event row unchanged: {before['events'] == after['events']}; "
                  f"jobs, outputs, job_activity unchanged: "
                  f"{all(before[t] == after[t] for t in ('jobs', 'outputs', 'job_activity'))}; "
                  f"keys matching their event: {keys['n']:,} of {after['events']['n'] + 1:,}")


if __name__ == "__main__":
    main()
