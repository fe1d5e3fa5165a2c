"""Rebuild projections from the events, or check that they would come out the same.

Both run in one transaction: snapshot the current rows, clear them, fold the events
set-based (sql/003_fold.sql), compare. A check always rolls back; a replay commits only
when something differs, so rebuilding a correct projection writes nothing. Readers see
the old projection until the commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from service.db import queries

# table -> (key columns, filter for one stream's rows, {0} being the stream parameter)
TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "jobs": (("id",), "id = stream_job_id({0})"),
    "predictions": (("id",), "job_id = stream_job_id({0}) OR (job_id IS NULL AND id = {0})"),
    "outputs": (("prediction_id", "index"), "job_id = stream_job_id({0})"),
}
PHASES = ("predictions", "outputs", "jobs")
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
    with conn.transaction() as tx:
        events = _lock_and_count(conn, stream)
        _snapshot(conn, stream)
        conn.execute("SELECT clear_projections(%s)", (stream,))
        for phase in PHASES:
            counts[phase] = conn.execute(f"SELECT rebuild_{phase}(%s) AS n", (stream,)).fetchone()["n"]
            report(phase, counts[phase])
        total, samples = _differences(conn, stream)
        committed = bool(total) and not check
        if not committed:
            raise psycopg.Rollback(tx)
    return ReplayResult(events, counts["jobs"], counts["predictions"],
                        time.perf_counter() - started, total, samples, committed)


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
        rows = conn.execute(f"""
            WITH n AS ({_rows_of(table, stream)}),
                 gone AS (SELECT * FROM replay_old_{table} EXCEPT ALL SELECT * FROM n),
                 came AS (SELECT * FROM n EXCEPT ALL SELECT * FROM replay_old_{table})
            SELECT 'old' AS side, to_jsonb(gone) AS row FROM gone
            UNION ALL SELECT 'new', to_jsonb(came) FROM came""", {"stream": stream}).fetchall()
        found = _pair_up(table, keys, rows)
        total += len(found)
        samples.extend(found[: max(0, SAMPLE - len(samples))])
    return total, samples


def _pair_up(table: str, keys: tuple[str, ...], rows: list[dict]) -> list[Difference]:
    old = {tuple(r["row"][k] for k in keys): r["row"] for r in rows if r["side"] == "old"}
    new = {tuple(r["row"][k] for k in keys): r["row"] for r in rows if r["side"] == "new"}
    found = []
    for key in sorted(old.keys() | new.keys(), key=str):
        if key not in new:
            found.append(Difference(table, key, "missing from rebuild"))
        elif key not in old:
            found.append(Difference(table, key, "only in rebuild"))
        else:
            changed = [c for c in old[key] if old[key][c] != new[key].get(c)]
            found.append(Difference(table, key, "changed", changed))
    return found
