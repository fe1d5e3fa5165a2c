"""Rebuild projections from the events, or check that they would come out the same.

Both run in one transaction: snapshot the current rows, clear them, fold the events
set-based (sql/003_fold.sql), compare. A check always rolls back; a replay commits only
when something differs, so rebuilding a correct projection writes nothing. Readers see
the old projection until the commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg

from service.db import queries

# table -> (key columns, filter for one stream's rows, {0} being the stream parameter)
TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "jobs": (("id",), "id = stream_job_id({0})"),
    "predictions": (("id",), "job_id = stream_job_id({0}) OR (job_id IS NULL AND id = {0})"),
    "outputs": (("prediction_id", "index"), "job_id = stream_job_id({0})"),
    "job_activity": (("job_id",), "job_id = stream_job_id({0})"),
}
PHASES = ("predictions", "outputs", "jobs")
# What a running replay reports in application_name, for /metrics (service/metrics.py).
STAGES = ("snapshot", *PHASES, "compare")
SAMPLE = 20


@dataclass
class Difference:
    table: str
    key: tuple
    kind: str  # missing (live has it, rebuild does not), extra, or changed
    columns: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        what = f" ({', '.join(self.columns)})" if self.columns else ""
        return f"{self.table} {'/'.join(map(str, self.key))}: {self.kind}{what}"


@dataclass
class ReplayResult:
    events: int
    jobs: int
    predictions: int
    seconds: float
    differences: int
    samples: list[Difference]
    committed: bool
    # seconds per step (lock, snapshot, clear, each phase, diff, commit), for benchmarks
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


Progress = Callable[[str, int], None]


def replay(conn: psycopg.Connection, *, stream: str | None = None, check: bool = False,
           progress: Progress | None = None) -> ReplayResult:
    """Rebuild all projections (or one stream's) from events; with check, change nothing."""
    started = time.perf_counter()
    report = progress or (lambda phase, n: None)
    counts: dict[str, int] = {}
    timings: dict[str, float] = {}
    with _timed(timings, "commit"), conn.transaction() as tx:
        with _timed(timings, "lock"):
            events = _lock_and_count(conn, stream)
        with _timed(timings, "snapshot"):
            _announce(conn, stream, "snapshot")
            _snapshot(conn, stream)
        with _timed(timings, "clear"):
            conn.execute("SELECT clear_projections(%s)", (stream,))
        for phase in PHASES:
            with _timed(timings, phase):
                _announce(conn, stream, phase)
                counts[phase] = conn.execute(f"SELECT rebuild_{phase}(%s) AS n", (stream,)).fetchone()["n"]
            report(phase, counts[phase])
        with _timed(timings, "diff"):
            _announce(conn, stream, "compare")
            total, samples = _differences(conn, stream)
        committed = bool(total) and not check
        if not committed:
            raise psycopg.Rollback(tx)
    timings["commit"] -= sum(v for k, v in timings.items() if k != "commit")
    return ReplayResult(events, counts["jobs"], counts["predictions"],
                        time.perf_counter() - started, total, samples, committed, timings)


def _announce(conn: psycopg.Connection, stream: str | None, stage: str) -> None:
    """Name the stage in this session's application_name until the transaction ends, so a
    scrape of /metrics from any process sees how far the replay is."""
    name = f"rjs-replay:{'job' if stream else 'all'}:{STAGES.index(stage) + 1}:{len(STAGES)}:{stage}"
    conn.execute("SELECT set_config('application_name', %s, true)", (name,))


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to timings[name]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - started


def _lock_and_count(conn: psycopg.Connection, stream: str | None) -> int:
    if stream is None:
        conn.execute(queries["lock_events_for_replay"])
    else:
        conn.execute(queries["lock_stream"], {"stream": stream})
    return conn.execute(queries["event_count"], {"stream": stream}).fetchone()["n"]


def _rows_of(table: str, stream: str | None) -> str:
    """SQL for the rows of `table` that a replay of `stream` (None: all) rebuilds."""
    return f"SELECT * FROM {table} WHERE " + (
        "true" if stream is None else TABLES[table][1].format("%(stream)s"))


def _snapshot(conn: psycopg.Connection, stream: str | None) -> None:
    for table in TABLES:
        conn.execute(f"CREATE TEMP TABLE replay_old_{table} ON COMMIT DROP AS "
                     + _rows_of(table, stream), {"stream": stream})


def _differences(conn: psycopg.Connection, stream: str | None) -> tuple[int, list[Difference]]:
    total: int = 0
    samples: list[Difference] = []
    for table, (keys, _) in TABLES.items():
        count, rows = _compare(conn, table, keys, stream, SAMPLE - len(samples))
        total += count
        samples.extend(_describe(table, keys, row["old"], row["new"]) for row in rows)
    return total, samples


def _compare(conn: psycopg.Connection, table: str, keys: tuple[str, ...], stream: str | None,
             limit: int) -> tuple[int, list[dict]]:
    """How many keys differ between the snapshot and the rebuilt rows, and the first
    `limit` of them as (old, new) JSON. The comparison stays in the database: a full
    replay differs in every row, and shipping them all would cost more than the rebuild."""
    def on(a: str, b: str) -> str:
        return " AND ".join(f"{a}.{k} = {b}.{k}" for k in keys)

    new_rows = _rows_of(table, stream)
    rows = conn.execute(f"""
        WITH diff AS (
            SELECT {", ".join(f"coalesce(o.{k}, n.{k}) AS {k}" for k in keys)},
                   count(*) OVER () AS total
            FROM replay_old_{table} o FULL JOIN ({new_rows}) n ON {on("o", "n")}
            WHERE o.{keys[0]} IS NULL OR n.{keys[0]} IS NULL OR ROW(o.*) IS DISTINCT FROM ROW(n.*)
            ORDER BY {", ".join(keys)} LIMIT {max(limit, 1)})
        SELECT d.total, to_jsonb(o) AS old, to_jsonb(n) AS new
        FROM diff d
        LEFT JOIN replay_old_{table} o ON {on("o", "d")}
        LEFT JOIN ({new_rows}) n ON {on("n", "d")}
        ORDER BY {", ".join(f"d.{k}" for k in keys)}""", {"stream": stream}).fetchall()
    return (rows[0]["total"] if rows else 0), rows[: max(limit, 0)]


def _describe(table: str, keys: tuple[str, ...], old: dict | None, new: dict | None) -> Difference:
    key = tuple((old or new)[k] for k in keys)
    if new is None:
        return Difference(table, key, "missing from rebuild")
    if old is None:
        return Difference(table, key, "only in rebuild")
    return Difference(table, key, "changed", [c for c in old if old[c] != new.get(c)])
