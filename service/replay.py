"""Rebuild the projections from the events beside the live ones, then write only what differs.

A replay works in a session of its own. There it creates temporary tables named like the
projections (jobs, predictions, outputs, job_activity); PostgreSQL looks in a session's
temporary schema first, so the rebuild functions the live service has (sql/rebuild.sql)
write into them, and the step rollups the jobs are derived from read them. Nothing else
sees those tables, and they go when the session ends, however it ends.

1. snapshot: a snapshot in which no append is in flight (a second session holds a SHARE
   lock on events for a moment and exports its snapshot), and W, the greatest position in
   it: every event at or below W is in the snapshot, every later one is above W.
2. predictions, outputs, jobs: the set-based rebuild of that snapshot. Webhooks go on.
3. indexes: the temporary tables' keys, built after their rows.
4. catch-up and compare: the streams with events above W are rebuilt again, from a new
   quiet snapshot, until few were left; then the keys of the rows that differ from the
   live ones are listed, in that same snapshot.
5. cut-over: one transaction, under the lock appends wait for: the streams changed since
   are rebuilt once more, then only the rows that differ are inserted, updated or deleted.
   This is the only time appends wait.

The fold is order-independent, so the result equals a stop-the-world rebuild. `check`
stops after the comparison. A replay killed or failing anywhere leaves the live projection
as it was: nothing is written to it before the cut-over commits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from service.errors import ServiceError

# table -> (key columns, its rows of some streams: {0} being the streams, a text[])
TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "jobs": (("id",), "id = ANY (stream_job_ids({0}))"),
    "predictions": (("id",), "job_id = ANY (stream_job_ids({0})) OR (job_id IS NULL AND id = ANY ({0}))"),
    "outputs": (("prediction_id", "index"),
                "job_id = ANY (stream_job_ids({0})) OR (job_id IS NULL AND prediction_id = ANY ({0}))"),
    "job_activity": (("job_id",), "job_id = ANY (stream_job_ids({0}))"),
}
PHASES = ("predictions", "outputs", "jobs")
# What a running replay reports in application_name, for /metrics (service/metrics.py).
STAGES = ("snapshot", *PHASES, "indexes", "compare", "cut-over")
# Share of a full replay's time each stage takes (scripts/bench/replay.py at 1,000,000
# events), for the estimate of the time left.
WEIGHTS = {"snapshot": 0.01, "predictions": 0.5, "outputs": 0.05, "jobs": 0.3, "indexes": 0.06,
           "compare": 0.07, "cut-over": 0.01}
SAMPLE = 20
# Held for the whole replay: a second one is refused while it runs.
_REPLAY_LOCK = 7_215_002
# Catch up again before comparing while the last round had more events than this.
_SMALL_DELTA = 2_000
_CATCH_UP_ROUNDS = 4


class ReplayBusy(ServiceError):
    """Another replay is running."""

    code = "replay_busy"
    status = 409


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
    # seconds per stage, for benchmarks; "cut-over" is the time appends waited
    timings: dict[str, float] = field(default_factory=dict)
    caught_up: int = 0  # events recorded while the replay ran, folded in after the snapshot

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def cut_over_ms(self) -> float:
        return self.timings.get("cut-over", 0.0) * 1000


@dataclass
class Step:
    """One finished stage, as the progress callback hears of it."""

    stage: str
    number: int
    rows: int
    seconds: float  # since the replay started
    events: int
    left: float  # estimated seconds to go

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


Progress = Callable[[Step], None]


@dataclass
class _Run:
    conn: psycopg.Connection
    other: psycopg.Connection
    streams: list[str] | None
    schema: str
    report: Progress
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    watermark: int = 0
    events: int = 0
    caught_up: int = 0

    def stage(self, name: str, rows: int = 0) -> None:
        done = sum(WEIGHTS[s] for s in STAGES[: STAGES.index(name) + 1])
        elapsed = time.perf_counter() - self.started
        self.report(Step(name, STAGES.index(name) + 1, rows, elapsed, self.events,
                         elapsed * (1 - done) / done))


def replay(conn: psycopg.Connection, *, stream: str | None = None, check: bool = False,
           progress: Progress | None = None) -> ReplayResult:
    """Rebuild all projections (or one stream's) from events; with check, change nothing.

    Runs on `conn`'s session (left in autocommit, with no temporary tables, when done) and
    on a second session opened with the same parameters."""
    saved = conn.autocommit
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.rollback()
    conn.autocommit = True
    try:
        with _second_session(conn) as other, _exclusive(conn):
            run = _Run(conn, other, None if stream is None else [stream],
                       conn.execute("SELECT current_schema() AS s").fetchone()["s"],
                       progress or (lambda step: None))
            try:
                return _replay(run, check)
            finally:
                _drop_scratch(conn)
    finally:
        conn.autocommit = saved


def _replay(run: _Run, check: bool) -> ReplayResult:
    _rebuild(run)
    _index(run)
    total, samples = _catch_up_and_compare(run)
    committed = bool(total) and not check
    if committed:
        total = _cut_over(run)
    rows = _scratch_counts(run)
    return ReplayResult(run.events, rows["jobs"], rows["predictions"],
                        time.perf_counter() - run.started, total, samples, committed,
                        run.timings, run.caught_up)


@contextmanager
def _second_session(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """The session that takes the brief locks and exports snapshots."""
    params = conn.info.get_parameters()
    if conn.info.password:
        params["password"] = conn.info.password
    with psycopg.connect(**params, autocommit=True, row_factory=conn.row_factory) as other:
        yield other


@contextmanager
def _exclusive(conn: psycopg.Connection) -> Iterator[None]:
    if not conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (_REPLAY_LOCK,)).fetchone()["ok"]:
        holder = conn.execute("""
            SELECT a.pid, round(extract(epoch FROM now() - a.backend_start)) AS seconds
            FROM pg_locks l JOIN pg_stat_activity a USING (pid)
            WHERE l.locktype = 'advisory' AND l.objid = %s AND l.granted""",
                              (_REPLAY_LOCK,)).fetchone()
        who = f" (server process {holder['pid']}, for {holder['seconds']:.0f} s)" if holder else ""
        raise ReplayBusy(f"another replay is running{who}; wait for it to finish, then try again")
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_REPLAY_LOCK,))
        conn.execute("RESET application_name")


@contextmanager
def _timed(run: _Run, name: str) -> Iterator[None]:
    """Add the seconds the block takes to the stage's timing, and name the stage in this
    session's application_name, so a scrape of /metrics from any process sees it."""
    _announce(run.conn, run.streams, name)
    started = time.perf_counter()
    try:
        yield
    finally:
        run.timings[name] = run.timings.get(name, 0.0) + time.perf_counter() - started


def _announce(conn: psycopg.Connection, streams: list[str] | None, stage: str) -> None:
    """Name the stage in this session's application_name until the replay ends."""
    name = f"rjs-replay:{'job' if streams else 'all'}:{STAGES.index(stage) + 1}:{len(STAGES)}:{stage}"
    conn.execute("SELECT set_config('application_name', %s, false)", (name,))


def _quiesce(conn: psycopg.Connection, streams: list[str] | None) -> None:
    """Wait until no append is in flight (for these streams), and keep new ones waiting
    until the transaction ends: the lock append_event takes, in a conflicting mode."""
    if streams is None:
        conn.execute("LOCK TABLE events IN SHARE MODE")
    else:
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(s, 0)) FROM unnest(%s::text[]) s",
                     (sorted(streams),))


def _begin_quiet_snapshot(run: _Run) -> int:
    """Begin a REPEATABLE READ transaction on the replay's session, in a snapshot no
    append was in flight in; return the greatest position it holds."""
    with run.other.transaction():
        _quiesce(run.other, run.streams)
        exported = run.other.execute("SELECT pg_export_snapshot() AS s").fetchone()["s"]
        run.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        run.conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(exported)))
    return run.conn.execute("SELECT coalesce(max(position), 0) AS w FROM events").fetchone()["w"]


def _rebuild(run: _Run) -> None:
    conn = run.conn
    try:
        # Local buffers for the scratch tables; only possible before the session's first
        # temporary table (a session that replayed before keeps what it had).
        conn.execute("SET temp_buffers = '256MB'")
    except psycopg.errors.InvalidParameterValue:
        pass
    try:
        with _timed(run, "snapshot"):
            run.watermark = _begin_quiet_snapshot(run)
            _create_scratch(run)
            run.events = _count_events(run, 0, run.watermark)
        run.stage("snapshot")
        for phase in PHASES:
            with _timed(run, phase):
                rows = conn.execute(f"SELECT rebuild_{phase}(%s::text[]) AS n",
                                    (run.streams,)).fetchone()["n"]
            run.stage(phase, rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
        raise


def _create_scratch(run: _Run) -> None:
    for table in TABLES:
        run.conn.execute(sql.SQL("CREATE TEMP TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
            sql.Identifier(table), sql.Identifier(run.schema, table)))


def _drop_scratch(conn: psycopg.Connection) -> None:
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.execute("ROLLBACK")
    for table in (*TABLES, *(f"replay_diff_{t}" for t in TABLES)):
        conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(sql.Identifier(table)))


def _index(run: _Run) -> None:
    with _timed(run, "indexes"):
        for table, (keys, _) in TABLES.items():
            run.conn.execute(sql.SQL("ALTER TABLE pg_temp.{} ADD PRIMARY KEY ({})").format(
                sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, keys))))
            run.conn.execute(sql.SQL("ANALYZE pg_temp.{}").format(sql.Identifier(table)))
            run.conn.execute(sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM pg_temp.{} LIMIT 0").format(
                sql.Identifier(f"replay_diff_{table}"), sql.SQL(", ").join(map(sql.Identifier, keys)),
                sql.Identifier(table)))
    run.stage("indexes")


def _count_events(run: _Run, after: int, upto: int) -> int:
    return run.conn.execute(
        "SELECT count(*) AS n FROM events WHERE position > %(after)s AND position <= %(upto)s "
        "AND (%(streams)s::text[] IS NULL OR stream = ANY (%(streams)s::text[]))",
        {"after": after, "upto": upto, "streams": run.streams}).fetchone()["n"]


def _catch_up(run: _Run, upto: int, *, compare: bool = False) -> int:
    """Rebuild again, in the scratch tables, the streams with events in (watermark, upto];
    return how many such events there were. With compare, also list those streams' rows
    that differ from the live ones."""
    changed = run.conn.execute(
        "SELECT array_agg(DISTINCT stream) AS streams, count(*) AS n FROM events "
        "WHERE position > %(after)s AND position <= %(upto)s "
        "AND (%(streams)s::text[] IS NULL OR stream = ANY (%(streams)s::text[]))",
        {"after": run.watermark, "upto": upto, "streams": run.streams}).fetchone()
    if changed["n"]:
        run.conn.execute("SELECT clear_projections(%(s)s::text[])", {"s": changed["streams"]})
        for phase in PHASES:
            run.conn.execute(f"SELECT rebuild_{phase}(%(s)s::text[])", {"s": changed["streams"]})
        if compare:
            _list_differences(run, changed["streams"])
    run.watermark = upto
    run.events += changed["n"]
    run.caught_up += changed["n"]
    return changed["n"]


def _catch_up_and_compare(run: _Run) -> tuple[int, list[Difference]]:
    with _timed(run, "compare"):
        for round_ in range(_CATCH_UP_ROUNDS):
            upto = _begin_quiet_snapshot(run)
            try:
                more = _catch_up(run, upto)
                if more <= _SMALL_DELTA or round_ == _CATCH_UP_ROUNDS - 1:
                    _clear_differences(run)
                    _list_differences(run, run.streams)
                    total, samples = _differences(run)
                    run.conn.execute("COMMIT")
                    break
                run.conn.execute("COMMIT")
            except BaseException:
                run.conn.execute("ROLLBACK")
                raise
    run.stage("compare", total)
    return total, samples


def _clear_differences(run: _Run) -> None:
    for table in TABLES:
        run.conn.execute(sql.SQL("TRUNCATE pg_temp.{}").format(sql.Identifier(f"replay_diff_{table}")))


def _rows(run: _Run, table: str, live: bool, streams: list[str] | None) -> sql.Composable:
    """SQL for the rows of a live or scratch table that belong to `streams` (None: all)."""
    name = sql.Identifier(run.schema, table) if live else sql.SQL("pg_temp.{}").format(sql.Identifier(table))
    where = sql.SQL("true") if streams is None else sql.SQL(TABLES[table][1].format("{streams}")).format(
        streams=sql.SQL("{}::text[]").format(sql.Literal(streams)))
    return sql.SQL("(SELECT * FROM {} WHERE {})").format(name, where)


def _on(keys: tuple[str, ...], a: str, b: str) -> sql.Composable:
    return sql.SQL(" AND ").join(sql.SQL("{}.{} = {}.{}").format(
        sql.Identifier(a), sql.Identifier(k), sql.Identifier(b), sql.Identifier(k)) for k in keys)


def _list_differences(run: _Run, streams: list[str] | None) -> None:
    """Add to replay_diff_<table> the keys of the rows of `streams` whose live and rebuilt
    versions differ (or exist on one side only)."""
    for table, (keys, _) in TABLES.items():
        cols = sql.SQL(", ").join(sql.SQL("coalesce(o.{0}, n.{0})").format(sql.Identifier(k)) for k in keys)
        run.conn.execute(sql.SQL("""
            INSERT INTO pg_temp.{diff}
            SELECT {cols} FROM {live} o FULL JOIN {new} n ON {on}
            WHERE o.{k} IS NULL OR n.{k} IS NULL OR ROW(o.*) IS DISTINCT FROM ROW(n.*)""").format(
            diff=sql.Identifier(f"replay_diff_{table}"), cols=cols, on=_on(keys, "o", "n"),
            live=_rows(run, table, True, streams), new=_rows(run, table, False, streams),
            k=sql.Identifier(keys[0])))


def _differences(run: _Run) -> tuple[int, list[Difference]]:
    total, samples = 0, []
    for table, (keys, _) in TABLES.items():
        diff = sql.SQL("(SELECT DISTINCT * FROM pg_temp.{} ORDER BY 1, 2) d" if len(keys) > 1 else
                       "(SELECT DISTINCT * FROM pg_temp.{} ORDER BY 1) d").format(
            sql.Identifier(f"replay_diff_{table}"))
        rows = run.conn.execute(sql.SQL("""
            SELECT count(*) OVER () AS total, to_jsonb(o) AS old, to_jsonb(n) AS new
            FROM {diff}
            LEFT JOIN {live} o ON {on_o}
            LEFT JOIN pg_temp.{new} n ON {on_n}
            LIMIT {limit}""").format(
            diff=diff, live=sql.Identifier(run.schema, table), new=sql.Identifier(table),
            on_o=_on(keys, "o", "d"), on_n=_on(keys, "n", "d"),
            limit=sql.Literal(max(SAMPLE - len(samples), 1)))).fetchall()
        total += rows[0]["total"] if rows else 0
        samples.extend(_describe(table, keys, r["old"], r["new"]) for r in rows[: SAMPLE - len(samples)])
    return total, samples


def _describe(table: str, keys: tuple[str, ...], old: dict | None, new: dict | None) -> Difference:
    key = tuple((old or new)[k] for k in keys)
    if new is None:
        return Difference(table, key, "missing from rebuild")
    if old is None:
        return Difference(table, key, "only in rebuild")
    return Difference(table, key, "changed", [c for c in old if old[c] != new.get(c)])


def _cut_over(run: _Run) -> int:
    """The short transaction: fold in what arrived since the comparison, then write only
    the rows that differ. Returns how many rows were inserted, updated or deleted."""
    with _timed(run, "cut-over"), run.conn.transaction():
        _quiesce(run.conn, run.streams)
        _catch_up(run, run.conn.execute("SELECT coalesce(max(position), 0) AS w FROM events")
                  .fetchone()["w"], compare=True)
        # From here on, unqualified names are the live tables again (triggers run below).
        path = run.conn.execute("SELECT current_setting('search_path') AS p").fetchone()["p"]
        run.conn.execute(sql.SQL("SET LOCAL search_path = {}, pg_temp").format(sql.SQL(path)))
        changed = sum(_apply(run, table, keys) for table, (keys, _) in TABLES.items())
    run.stage("cut-over", changed)
    return changed


def _apply(run: _Run, table: str, keys: tuple[str, ...]) -> int:
    conn = run.conn
    columns = [r["attname"] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum", (f"pg_temp.{table}",))]
    names = {"live": sql.Identifier(run.schema, table), "new": sql.SQL("pg_temp.{}").format(sql.Identifier(table)),
             "diff": sql.SQL("(SELECT DISTINCT * FROM pg_temp.{}) d").format(
                 sql.Identifier(f"replay_diff_{table}")),
             "on_ld": _on(keys, "l", "d"), "on_nd": _on(keys, "n", "d"), "on_ln": _on(keys, "l", "n"),
             "cols": sql.SQL(", ").join(map(sql.Identifier, columns)),
             "new_cols": sql.SQL(", ").join(sql.SQL("n.{}").format(sql.Identifier(c)) for c in columns)}
    deleted = conn.execute(sql.SQL("""
        DELETE FROM {live} l USING {diff}
        WHERE {on_ld} AND NOT EXISTS (SELECT FROM {new} n WHERE {on_ln})""").format(**names)).rowcount
    updated = conn.execute(sql.SQL("""
        UPDATE {live} l SET ({cols}) = ROW({new_cols})
        FROM {diff} JOIN {new} n ON {on_nd}
        WHERE {on_ld} AND ROW(l.*) IS DISTINCT FROM ROW(n.*)""").format(**names)).rowcount
    inserted = conn.execute(sql.SQL("""
        INSERT INTO {live} ({cols})
        SELECT {new_cols} FROM {diff} JOIN {new} n ON {on_nd}
        WHERE NOT EXISTS (SELECT FROM {live} l WHERE {on_ln})""").format(**names)).rowcount
    return deleted + updated + inserted


def _scratch_counts(run: _Run) -> dict[str, int]:
    return {t: run.conn.execute(sql.SQL("SELECT count(*) AS n FROM pg_temp.{}").format(sql.Identifier(t)))
            .fetchone()["n"] for t in ("jobs", "predictions")}
