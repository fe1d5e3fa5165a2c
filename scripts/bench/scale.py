"""The event store at scale: append, one job's events, full replay, retention, disk.

    .venv/bin/python scripts/bench/scale.py [--sizes 1000000,20000000] [--database-url URL]

For each size, a scratch database is migrated and filled with generated events made from the
real payloads (generate_events.sql, set-based; each webhook's event keeps what webhook_facts
keeps, the keys go to event_keys, partitions are made ahead), then measured, each figure
at every size before the next figure:

* full replay (service.replay.replay; the projections start empty, or with --replay-over
  live are those a first, untimed replay built): events/s, and the time of each stage.
  The smallest store's replay is timed before and after the others' (--replays times
  each side), and the ratio is taken against its mean: a ratio of two replays taken tens
  of minutes apart moved with the machine (the 1M rate moved by 18% between runs of
  unchanged code, more than the gap measured);
* (untimed) after each replay the store is let come to rest: the projections vacuumed, a
  checkpoint (settle);
* append throughput: new jobs' webhooks appended one transaction each through append_webhook
  (the live path's SQL), from one connection: events/s, in --append-rounds rounds taking
  turns between the sizes and the baselines (the order reversed each round), the median
  round of each store;
* (untimed) the store let come to rest again, with what the appends wrote;
* one job's events through the API (GET /api/jobs/<id>/events, Flask's test client on a
  real pool): p50 and p99 over jobs picked at random from the whole store, first as they
  come (cold), then the same jobs again (warm); per read, the blocks it touched and those
  read from outside shared buffers, and the ms of those reads (track_io_timing);
* bytes on disk per event (events with its partitions and indexes, event_keys).

The baselines, in the same run: the unpartitioned store (the SQL of each --baseline-commits
commit, taken from git) at the first size, its projections filled by that SQL's own rebuild
functions, its appends measured in the same rounds as the partitioned stores' (not its
replay: today's replay needs today's SQL), and its bytes per event with whole bodies. The
default two: 6504d9f, the store as issue 19 found it, and be99c1a, the last commit before
issue 19's merge (issue 20's fold work in, unpartitioned), which tells the store's own cost
apart from the fold's. Then, on a partitioned store of the first
size: a day of delivery log (whole bodies; --log-rows of them) is dropped by prune while
webhooks are appended at --rate per second: the slowest append (the acknowledgement waits
for its commit) and how many failed; and the delivery log's bytes per webhook, for the disk
a user making --images-per-day needs per month.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from common import (
    PROMPTS,
    ROOT,
    add_database_url,
    backend_cpu_seconds,
    scratch_database,
    server,
    server_version,
    templates,
)
from psycopg import sql
from psycopg.types.json import Jsonb

from service import create_app, db, store
from service.commands import new_job_id
from service.replay import replay

GENERATE_SQL = (Path(__file__).with_name("generate_events.sql")).read_text()
TEMPLATE_PROMPT = "A chariot pulled by a team of six rainbow unicorns"
EVENTS_PER_JOB = 5.1
# The partitioned store keeps a webhook's facts; today's kept the whole body.
FACTS_SQL = GENERATE_SQL.replace(
    "SELECT e.event_key, j.job, e.type, e.data, e.metadata,",
    "SELECT e.event_key, j.job, e.type,\n"
    "       CASE WHEN e.type = 'replicate.webhook' THEN webhook_facts(e.data) ELSE e.data END,\n"
    "       e.metadata,")
assert FACTS_SQL != GENERATE_SQL
WEBHOOKS_PER_IMAGE = 3.5  # start, a log or two, completed (the 300,000-400,000 a day)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000,20000000", help="store sizes, comma-separated")
    parser.add_argument("--appends", type=int, default=3000, help="webhooks appended per round")
    parser.add_argument("--append-rounds", type=int, default=5,
                        help="rounds of appends, taking turns between the sizes")
    parser.add_argument("--replays", type=int, default=1,
                        help="the smallest store's timed replays before the others', and again after")
    parser.add_argument("--reads", type=int, default=1000,
                        help="jobs whose events are read (p99: the 10th slowest of 1,000)")
    parser.add_argument("--rate", type=int, default=300, help="webhooks/s while a day is dropped")
    parser.add_argument("--log-rows", type=int, default=100_000, help="deliveries in the dropped day")
    parser.add_argument("--images-per-day", type=int, default=100_000)
    parser.add_argument("--baseline-commits", default="6504d9f,be99c1a",
                        help="the unpartitioned stores' SQL, from git, comma-separated "
                             "(\"\": none, for a quicker run)")
    parser.add_argument("--no-replay", action="store_true", help="skip the full replay")
    parser.add_argument("--replay-over", choices=("empty", "live"), default="empty",
                        help="the timed replay starts from empty projections (a new store, or "
                             "after a change of the fold's rules: every row is written) or runs "
                             "over the live ones (the projection is rebuilt and compared, nothing "
                             "differs; the replay benchmark's case)")
    parser.add_argument("--drop-os-cache", action="store_true",
                        help="empty the page cache before the cold reads (root; the server on "
                             "this machine), so they come from disk at every size")
    parser.add_argument("--keep", action="store_true",
                        help="keep the stores' databases (bench_scale_<size>, and the baselines' "
                             "bench_scale_today_<commit>, built again by every run) afterwards")
    parser.add_argument("--reuse", action="store_true",
                        help="measure the stores --keep kept, where they exist, without building "
                             "them again (their projections are emptied first for a timed replay "
                             "over empty ones)")
    add_database_url(parser)
    return parser.parse_args()


def baseline_sql(commit: str, into: Path) -> Path:
    subprocess.run(f"git -C {ROOT} archive {commit} sql | tar -x -C {into}", shell=True, check=True)
    return into / "sql"


def generate(url: str, events: int, partitioned: bool, chunk_jobs: int = 20_000) -> float:
    """Fill events with `events` generated events; returns the seconds it took."""
    params = {name: Jsonb(body) for name, body in templates().items()}
    params |= {"prompts": PROMPTS, "template_prompt": TEMPLATE_PROMPT}
    started, written, lo = time.perf_counter(), 0, 0
    with db.connect(url, autocommit=True) as conn:
        if partitioned:  # as the worker keeps them: ahead of the appends
            conn.execute("SELECT count(*) FROM maintain_event_partitions(%s)",
                         (math.ceil(events / 1_000_000) + 2,))
        while written < events:
            jobs = min(chunk_jobs, math.ceil((events - written) / EVENTS_PER_JOB) + 1)
            sql = FACTS_SQL if partitioned else GENERATE_SQL
            written += conn.execute(sql, params | {"lo": lo, "hi": lo + jobs,
                                                   "max_rows": events - written}).rowcount
            lo += jobs
            elapsed = time.perf_counter() - started
            print(f"    generated {written:>11,} / {events:,} ({elapsed:.0f} s)", flush=True)
        if partitioned:
            conn.execute("INSERT INTO event_keys SELECT event_key, position FROM events")
        conn.execute("VACUUM (ANALYZE) events")
        if partitioned:
            conn.execute("VACUUM (ANALYZE) event_keys")
    return time.perf_counter() - started


def settle(url: str, appended: bool = False) -> float:
    """Let the store come to rest after its replay, as a live one is between replays: vacuum
    the projections the replay rewrote (their dead rows, the visibility map) and write the
    dirty pages out. Without it, at 20M the appends were measured while the replay's ~12 GB
    of rewritten projections were being checkpointed and vacuumed (run 1: 165 appends/s)."""
    started = time.perf_counter()
    with db.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) jobs, predictions, outputs, job_activity, tasks")
        if appended:  # and what the appends wrote besides
            conn.execute("VACUUM (ANALYZE) events, event_keys, deliveries")
        conn.execute("CHECKPOINT")
    return time.perf_counter() - started


def full_replay(url: str) -> float:
    with db.connect(url) as conn:
        result = replay(conn)
    print("    replay stages: " + ", ".join(f"{stage} {seconds:.1f} s"
                                            for stage, seconds in result.timings.items()), flush=True)
    return result.events_per_second


def built(url: str) -> int:
    """How many events a kept store holds (0: none, build it)."""
    with db.connect(url) as conn:
        return conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"]


# The job.created of each new job a round of appends sends webhooks to.
JOB_CREATED = {"model": "stability-ai/sdxl", "count": 1}


def round_webhooks(jobs: list[str], n: int) -> Iterator[tuple[str, str, dict, dict]]:
    """A round's n webhooks over the new jobs (webhook id, job, body, metadata): the job
    i % len(jobs), its SDXL prediction's processing, more logs and succeeded bodies in turn,
    webhook ids new for each round and ascending within it, as Replicate's (KSUIDs: time
    first) are. Made one at a time, as they are sent."""
    bodies = templates()
    states = [bodies["processing"], bodies["more_logs"], bodies["succeeded"]]
    run = uuid.uuid4().hex[:8]
    for i in range(n):
        job = jobs[i % len(jobs)]
        yield (f"msg_{run}_{i}", job, dict(states[i % 3], id=f"p{run}{i % len(jobs)}"),
               {"query": {"job": job, "step": "1"}})


def appends(url: str, n: int) -> tuple[float, dict]:
    """Webhooks of new jobs (round_webhooks), one transaction each, through append_webhook:
    events/s, and io_per's figures per append, with the backend's CPU µs per append where the
    server runs on this machine (the rounds' rates move with the machine, CPU time less). The
    jobs' ids are the service's (UUIDv7: time-ordered)."""
    jobs = [new_job_id() for _ in range(max(1, n // 4))]
    local = urlsplit(url).hostname in (None, "", "localhost", "127.0.0.1")  # its backend's /proc here
    with db.connect(url, autocommit=True) as conn:
        for job in jobs:
            conn.execute("SELECT * FROM append_event(%s, %s, 'job.created', %s)",
                         (f"created:{job}", job, Jsonb(JOB_CREATED)))
    time.sleep(1)  # the creating connection's counts land before `before` is read
    before = database_io(url)
    with db.connect(url, autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
        cpu = backend_cpu_seconds(pid) if local else math.nan
        started = time.perf_counter()
        for webhook_id, job, body, metadata in round_webhooks(jobs, n):
            conn.execute("SELECT * FROM append_webhook(%s, %s, %s, %s)",
                         (webhook_id, job, Jsonb(body), Jsonb(metadata)))
        rate = n / (time.perf_counter() - started)
        cpu = (backend_cpu_seconds(pid) - cpu) / n if local else math.nan
    return rate, io_per(url, before, n) | {"cpu_us": cpu * 1e6}


def time_io(url: str) -> None:
    """Have the database's new sessions time their reads (track_io_timing), where this role
    may (a superuser); elsewhere the ms of reads show as 0."""
    with db.connect(url, autocommit=True) as conn, suppress(psycopg.Error):
        conn.execute(sql.SQL("ALTER DATABASE {} SET track_io_timing = on").format(
            sql.Identifier(conn.info.dbname)))


def database_io(url: str) -> dict:
    """The blocks this database's backends found in shared buffers (hit) or had to read from
    outside them (read: the OS's page cache or the disk), and the ms those reads took (counted
    by backends with track_io_timing on); and the server's WAL so far, in bytes and in full-page
    images (pg_stat_wal: the whole server's, and only this benchmark writes)."""
    with db.connect(url) as conn:
        return conn.execute("SELECT blks_hit AS hit, blks_read AS read, blk_read_time AS ms, "
                            "(SELECT wal_bytes FROM pg_stat_wal)::float AS wal, "
                            "(SELECT wal_fpi FROM pg_stat_wal) AS fpi "
                            "FROM pg_stat_database WHERE datname = current_database()").fetchone()


def io_per(url: str, before: dict, n: int) -> dict:
    """Per operation of the n done since `before` (database_io), with their connections
    closed (a backend hands its counts on as it exits): the blocks touched, those read from
    outside shared buffers, the ms of those reads, and the WAL written (bytes, and full-page
    images: a page's first change after a checkpoint logs the whole 8 kB page)."""
    time.sleep(1)
    after = database_io(url)
    per = {k: (after[k] - before[k]) / n for k in ("hit", "read", "ms", "wal", "fpi")}
    return {"blocks": per["hit"] + per["read"], "read": per["read"], "io_ms": per["ms"],
            "wal": per["wal"], "fpi": per["fpi"]}


def read_pass(url: str, jobs: list[str], warm_up: str) -> tuple[list[float], dict]:
    """Each job's events through the API (Flask's test client on a new pool, closed before
    the counts are read): the times in ms, and io_per's figures per read."""
    before = database_io(url)
    app = create_app({"DATABASE_URL": url, "TESTING": True})
    times = []
    try:
        client = app.test_client()
        client.get(f"/api/jobs/{warm_up}/events")  # open the pool's connection, untimed
        for job in jobs:
            started = time.perf_counter()
            response = client.get(f"/api/jobs/{job}/events")
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200 and response.get_json()["events"], response.status_code
    finally:
        app.extensions["db_pool"].close()
    return sorted(times), io_per(url, before, len(jobs))


def reads(url: str, n: int, drop_os_cache: bool = False) -> dict:
    """One job's events through the API, for n jobs picked at random from the whole store:
    p50 and p99 in ms, first as they come (cold: what the page cache holds then, or with
    drop_os_cache nothing of it) and then the same jobs again (warm), with each pass's blocks
    per read (see read_pass)."""
    with db.connect(url, autocommit=True) as conn:
        # SYSTEM sampling at the percentage that gives ~20n rows: blocks from every part of
        # the table (a LIMIT on a larger sample would keep only the table's first blocks)
        rows = conn.execute("SELECT greatest(reltuples, 1) AS n FROM pg_class WHERE oid = 'jobs'::regclass"
                            ).fetchone()["n"]
        percent = min(100.0, 100.0 * 20 * (n + 1) / rows)
        jobs = [str(r["id"]) for r in conn.execute(
            "SELECT id FROM jobs TABLESAMPLE SYSTEM (%s) REPEATABLE (1)", (percent,))]
    picked = random.Random(1).sample(jobs, min(n + 1, len(jobs)))
    out = {}
    if drop_os_cache:
        drop_page_cache()
    for label in ("cold", "warm"):
        times, io = read_pass(url, picked[1:], picked[0])
        out[label] = {"p50": statistics.median(times), "p99": times[max(0, math.ceil(0.99 * len(times)) - 1)],
                      **io}
    return out


def drop_page_cache() -> None:
    """Empty the operating system's page cache (root only, and the server on this machine):
    a cold read then comes from the disk at any size of the store, where otherwise a small
    store is read from memory and a large one from disk. PostgreSQL's own shared buffers
    keep what they hold."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        raise SystemExit(f"--drop-os-cache: cannot empty the page cache ({exc}); run as root") from exc


def bytes_per_event(url: str, partitioned: bool) -> float:
    with db.connect(url) as conn:
        sql = ("SELECT (pg_total_relation_size('events') + pg_total_relation_size('event_keys') "
               " + (SELECT sum(bytes) FROM event_partitions))::float / (SELECT count(*) FROM events) AS b"
               if partitioned else
               "SELECT pg_total_relation_size('events')::float / (SELECT count(*) FROM events) AS b")
        return conn.execute(sql).fetchone()["b"]


def prepare(url: str, size: int, partitioned: bool, args: argparse.Namespace) -> dict:
    """Build the store (or take the kept one), with the live projections a replay over them
    needs, at rest."""
    label = "partitioned" if partitioned else "unpartitioned (today)"
    print(f"  {label}, {size:,} events:", flush=True)
    kept = built(url) if args.reuse and partitioned else 0
    if kept:
        out = {"build_s": math.nan}
        print(f"    reused a kept store of {kept:,} events", flush=True)
    else:
        out = {"build_s": generate(url, size, partitioned)}
        print(f"    built in {out['build_s']:.0f} s", flush=True)
    # untimed: the API reads jobs, a replay over live ones needs them, and an append updates
    # projections the size of the store's
    if partitioned and not kept and (args.no_replay or args.replay_over == "live"):
        full_replay(url)
        settle(url)
    elif not partitioned:
        rebuild_in_place(url)
        settle(url)
    return out


def rebuild_in_place(url: str) -> None:
    """Fill an unpartitioned baseline's projections with its own SQL's rebuild functions, in
    one transaction (today's replay calls today's SQL, which its store lacks): its appends
    then update projections as large as the partitioned store's of its size, not empty ones."""
    started = time.perf_counter()
    with db.connect(url) as conn, conn.transaction():
        conn.execute("SET LOCAL jit = off")
        for step in ("clear_projections", "rebuild_predictions", "rebuild_outputs", "rebuild_jobs"):
            conn.execute(sql.SQL("SELECT {}(NULL::text[])").format(sql.Identifier(step)))
    print(f"    projections rebuilt with its own SQL in {time.perf_counter() - started:.0f} s", flush=True)


def timed_replay(url: str, size: int, args: argparse.Namespace) -> float:
    """One timed full replay (over emptied projections, or over the live ones), then the
    store let come to rest."""
    print(f"  full replay at {size:,}:", flush=True)
    if args.replay_over == "empty":  # as a new store
        with db.connect(url, autocommit=True) as conn:
            conn.execute("TRUNCATE jobs, predictions, outputs, job_activity")
    rate = full_replay(url)
    print(f"    {rate:,.0f} ev/s; settled in {settle(url):.0f} s (vacuum of the projections, "
          "checkpoint)", flush=True)
    return rate


def replays(urls: dict[int, str], args: argparse.Namespace) -> dict[int, list[float]]:
    """Each size's timed replays: the smallest's before and after the others'."""
    sizes = list(urls)
    order = [sizes[0]] * args.replays + sizes[1:] + [sizes[0]] * args.replays
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for size in order:
        rates[size].append(timed_replay(urls[size], size, args))
    return rates


def append_rounds(stores: dict[str, str], args: argparse.Namespace) -> dict[str, list[tuple[float, dict]]]:
    """Rounds of appends taking turns between the stores (label: url), the order reversed
    each round, so that what the machine does meanwhile falls on every store alike."""
    for url in stores.values():
        time_io(url)
    rounds: dict[str, list[tuple[float, dict]]] = {label: [] for label in stores}
    for r in range(args.append_rounds):
        for label in (list(stores) if r % 2 == 0 else list(stores)[::-1]):
            rate, io = appends(stores[label], args.appends)
            rounds[label].append((rate, io))
            print(f"  append round {r + 1} at {label}: {rate:,.0f} ev/s (per append {io['blocks']:.0f} "
                  f"blocks, {io['read']:.2f} read from outside shared buffers in {io['io_ms']:.3f} ms; "
                  f"backend CPU {io['cpu_us']:,.0f} µs; "
                  f"WAL {io['wal'] / 1024:.1f} kB, {io['fpi']:.2f} full pages)", flush=True)
    return rounds


def median_round(rounds: list[tuple[float, dict]]) -> tuple[float, dict]:
    """The round with the median rate (the lower middle one of an even number)."""
    ranked = sorted(rounds, key=lambda r: r[0])
    return ranked[(len(ranked) - 1) // 2]


def finish(url: str, label: str, partitioned: bool, out: dict, args: argparse.Namespace) -> None:
    """The figures read after the appends: bytes per event, and one job's events."""
    out["bytes"] = bytes_per_event(url, partitioned)
    print(f"  {label}: {out['bytes']:,.0f} B/event", flush=True)
    # today's schema lacks what the API reads now (job_first_position): its reads are not measured
    if partitioned:
        settle(url, appended=True)  # not autovacuum's work on the appends while reads are timed
        out["reads"] = reads(url, args.reads, args.drop_os_cache)
        for label, r in out["reads"].items():
            print(f"    job events, {label}: p50 {r['p50']:.1f} ms p99 {r['p99']:.1f} ms; per read "
                  f"{r['blocks']:.1f} blocks, {r['read']:.1f} read from outside shared buffers "
                  f"in {r['io_ms']:.2f} ms", flush=True)


def measure(urls: dict[int, str], baselines: dict[str, str],
            args: argparse.Namespace) -> tuple[dict[int, dict], dict[str, dict]]:
    """Every figure of the partitioned stores (size: url, smallest first) and of the
    unpartitioned baselines at the smallest size (commit: url), each figure taken at every
    store before the next; the appends of all of them in the same rounds."""
    lo = min(urls)
    results = {size: prepare(url, size, True, args) for size, url in urls.items()}
    todays = {commit: prepare(url, lo, False, args) for commit, url in baselines.items()}
    if not args.no_replay:
        for size, rates in replays(urls, args).items():
            results[size]["replays"] = rates
            results[size]["replay"] = statistics.mean(rates)
    stores = {f"{size:,}": (results[size], url) for size, url in urls.items()}
    stores |= {f"{lo:,} unpartitioned ({commit})": (todays[commit], url) for commit, url in baselines.items()}
    for label, rounds in append_rounds({label: url for label, (_, url) in stores.items()}, args).items():
        out = stores[label][0]
        out["append_rounds"] = [rate for rate, _ in rounds]
        out["append"], out["append_io"] = median_round(rounds)
        out["append_cpu"] = statistics.median(io["cpu_us"] for _, io in rounds)
    for size, url in urls.items():
        finish(url, f"{size:,} events", True, results[size], args)
    for commit, url in baselines.items():
        finish(url, f"{lo:,} events, unpartitioned ({commit})", False, todays[commit], args)
    return results, todays


def retention(url: str, args: argparse.Namespace) -> dict:
    """Drop a day of delivery log while webhooks arrive at args.rate/s."""
    bodies = templates()
    old = (datetime.now(UTC) - timedelta(days=40)).date()
    with db.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE store_partitions.deliveries_{old:%Y%m%d} PARTITION OF deliveries "
                     f"FOR VALUES FROM ('{old} 00:00+00') TO ('{old + timedelta(days=1)} 00:00+00')")
        conn.execute("""
            INSERT INTO deliveries (received_at, position, webhook_id, headers, body)
            SELECT %s::timestamptz + i * interval '1 ms', i, 'msg_' || i,
                   '{"webhook-id": "x", "content-type": "application/json"}',
                   (ARRAY[%s::jsonb, %s::jsonb, %s::jsonb])[1 + i %% 3] || jsonb_build_object('id', 'p' || i)
            FROM generate_series(1, %s) i""",
                     (datetime(old.year, old.month, old.day, tzinfo=UTC), Jsonb(bodies["processing"]),
                      Jsonb(bodies["more_logs"]), Jsonb(bodies["succeeded"]), args.log_rows))
        row = conn.execute("SELECT sum(bytes)::float AS b FROM delivery_partitions "
                           "WHERE day = %s", (old,)).fetchone()
        per_delivery = row["b"] / args.log_rows
        job = new_job_id()
        conn.execute("SELECT * FROM append_event(%s, %s, 'job.created', '{}')", (f"created:{job}", job))

    latencies, failures, stop = [], [], threading.Event()

    def flow() -> None:
        run = uuid.uuid4().hex[:8]
        with db.connect(url, autocommit=True) as conn:
            i, started = 0, time.perf_counter()
            while not stop.is_set():
                due = started + i / args.rate
                time.sleep(max(0.0, due - time.perf_counter()))
                t0 = time.perf_counter()
                try:
                    body = dict(bodies["processing"], id=f"q{run}{i % 50}")
                    conn.execute("SELECT * FROM append_webhook(%s, %s, %s, '{}')",
                                 (f"msg_{run}_{i}", job, Jsonb(body)))
                    latencies.append((time.perf_counter() - t0) * 1000)
                except Exception as exc:  # counted: a lost webhook
                    failures.append(repr(exc))
                i += 1

    threads = [threading.Thread(target=flow)]
    for t in threads:
        t.start()
    time.sleep(3)
    with db.connect(url, autocommit=True) as conn:
        t0 = time.perf_counter()
        dropped = store.prune(conn, 30)
        drop_ms = (time.perf_counter() - t0) * 1000
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    return {"dropped": [p.partition for p in dropped], "freed": sum(p.bytes for p in dropped),
            "drop_ms": drop_ms, "max_ms": max(latencies),
            "p99_ms": sorted(latencies)[int(0.99 * len(latencies))],
            "sent": len(latencies) + len(failures), "lost": len(failures), "per_delivery": per_delivery}


def main() -> None:
    args = parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    with server(args.database_url) as (server_url, where):
        print(f"server: {where}, PostgreSQL {server_version(server_url)}; sizes {sizes}", flush=True)
        with ExitStack() as stores:
            urls = {size: stores.enter_context(scratch_database(server_url, f"bench_scale_{size}",
                                                                keep=args.keep, reuse=args.reuse))
                    for size in sizes}
            baselines = {}
            for commit in filter(None, args.baseline_commits.split(",")):
                old_sql = baseline_sql(commit, Path(stores.enter_context(tempfile.TemporaryDirectory())))
                baselines[commit] = stores.enter_context(
                    scratch_database(server_url, f"bench_scale_today_{commit}", old_sql, keep=args.keep))
            results, todays = measure(urls, baselines, args)
            kept = retention(urls[sizes[0]], args)
    report(args, sizes, results, todays, kept)


def report(args: argparse.Namespace, sizes: list[int], results: dict, todays: dict, kept: dict) -> None:
    lo, hi = sizes[0], sizes[-1]
    small, large = results[lo], results[hi]
    # the first baseline: the store as the issue found it (none with --baseline-commits "")
    today = next(iter(todays.values()), {"bytes": math.nan})
    print("\nfigures (goal in brackets):")
    print(f"  append at {hi:,} vs {lo:,}: {large['append']:,.0f} / {small['append']:,.0f} ev/s "
          f"= {large['append'] / small['append']:.2f}x [>= 0.9x] (median rounds; every round: "
          + "; ".join(f"{size:,} " + ", ".join(f"{r:,.0f}" for r in results[size]["append_rounds"])
                      for size in sizes)
          + f"; WAL per append {large['append_io']['wal'] / 1024:.1f} / "
          f"{small['append_io']['wal'] / 1024:.1f} kB, full pages {large['append_io']['fpi']:.2f} / "
          f"{small['append_io']['fpi']:.2f})")
    print(f"  backend CPU per append, median of the rounds: {hi:,} {large['append_cpu']:,.0f} µs, {lo:,} "
          f"{small['append_cpu']:,.0f} µs; throughput if CPU-bound alike "
          f"{small['append_cpu'] / large['append_cpu']:.2f}x; "
          + "; ".join(f"unpartitioned ({commit}) {base['append_cpu']:,.0f} µs, the partitioned at {lo:,} "
                      f"{base['append_cpu'] / small['append_cpu']:.2f}x of it"
                      for commit, base in todays.items()))
    for commit, base in todays.items():
        print(f"  append partitioned vs unpartitioned ({commit}) at {lo:,}: {small['append']:,.0f} / "
              f"{base['append']:,.0f} ev/s = {small['append'] / base['append']:.2f}x [>= 0.9x] (median "
              "rounds, in the same rounds; its rounds: "
              + ", ".join(f"{r:,.0f}" for r in base["append_rounds"])
              + f"; WAL per append {base['append_io']['wal'] / 1024:.1f} kB)")
    for label in ("cold", "warm"):
        a, b = large["reads"][label], small["reads"][label]
        print(f"  one job's events p99 at {hi:,} vs {lo:,}, {label}: {a['p99']:.1f} / {b['p99']:.1f} ms "
              f"= {a['p99'] / b['p99']:.2f}x [<= 1.5x] (p50 {a['p50']:.1f} / {b['p50']:.1f} ms; "
              f"blocks per read {a['blocks']:.1f} / {b['blocks']:.1f}, from outside shared buffers "
              f"{a['read']:.1f} / {b['read']:.1f} in {a['io_ms']:.2f} / {b['io_ms']:.2f} ms)")
    if not args.no_replay:
        print(f"  full replay over {args.replay_over} projections at {hi:,} vs {lo:,}: "
              f"{large['replay']:,.0f} / {small['replay']:,.0f} ev/s "
              f"= {large['replay'] / small['replay']:.2f}x [>= 1x] "
              f"({lo:,} before and after: " + ", ".join(f"{r:,.0f}" for r in small["replays"])
              + f" ev/s, {large['replay'] / max(small['replays']):.2f}x the faster)")
    print(f"  dropping a day of delivery log ({args.log_rows:,} bodies, {kept['freed'] / 2**20:,.0f} MB) "
          f"at {args.rate}/s: drop {kept['drop_ms']:.0f} ms, slowest append {kept['max_ms']:.0f} ms "
          f"(p99 {kept['p99_ms']:.0f} ms) [<= 250 ms], {kept['lost']} lost of {kept['sent']:,} [0]")
    events_b, log_b, whole_b = small["bytes"], kept["per_delivery"], today["bytes"]
    per_day = args.images_per_day * WEBHOOKS_PER_IMAGE
    month = per_day * 30.4
    print(f"  bytes per event: today's store {whole_b:,.0f} B (whole bodies); now {events_b + log_b:,.0f} B "
          f"while the delivery log keeps it ({events_b:,.0f} event + {log_b:,.0f} delivery), "
          f"{events_b:,.0f} B after retention")
    print(f"  {args.images_per_day:,} images/day = {per_day:,.0f} webhooks/day: "
          f"{(month * events_b + per_day * 30 * log_b) / 1e9:,.1f} GB after the first month "
          f"(30 days of log), then +{month * events_b / 1e9:,.1f} GB a month "
          f"(today's store: +{month * whole_b / 1e9:,.1f} GB a month)")


if __name__ == "__main__":
    main()
