"""Rebuild the projections from the events beside the live ones, then write only what differs.

A replay works in a session of its own. There it creates temporary tables named like the
projections (jobs, predictions, outputs, job_activity); PostgreSQL looks in a session's
temporary schema first, so the rebuild functions the live service has (sql/rebuild.sql)
write into them, and the step rollups the jobs are derived from read them. Nothing else
sees those tables, and they go when the session ends, however it ends.

1. snapshot: a snapshot in which no append is in flight (a second session holds a SHARE
   lock on events for a moment and exports its snapshot), and W, the greatest position in
   it: every event at or below W is in the snapshot, every later one is above W.
2. scan, predictions, outputs, jobs: the set-based rebuild of that snapshot (scan reads
   the events once, a window at a time, for the three after it). Webhooks go on.
3. indexes: the temporary tables' keys and statistics, built after their rows.
4. compare: the streams with events above W are rebuilt again, from a new quiet snapshot,
   until few arrived during a round; then the rows that differ from the live ones are
   listed, in that same snapshot; then catching up goes on, listing only the changed
   streams' rows again, until a round sees at most a few dozen events.
5. write (only in batches): the listed rows, a few hundred streams at a time, each batch
   under those streams' locks.
6. cut-over: one transaction, under the lock appends wait for: the streams changed since
   are rebuilt once more, then only the rows that differ are inserted, updated or deleted.
   This is the only time appends wait.

The fold is order-independent, so the result equals a stop-the-world rebuild. `check`
stops after the comparison. A replay killed or failing anywhere leaves the live projection
as it was: nothing is written to it before the cut-over commits.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from service.db import queries
from service.errors import ServiceError
from service.scratch import TABLES, Difference, Scratch

__all__ = ["TABLES", "Difference", "ReplayBusy", "ReplayResult", "Space", "Step", "replay", "scratch_space"]

PHASES = ("scan", "predictions", "outputs", "jobs")
# What a running replay reports in application_name, for /metrics (service/metrics.py).
STAGES = ("snapshot", *PHASES, "indexes", "compare", "write", "cut-over")
# Share of a full replay's time each stage takes (scripts/bench/replay.py at 1,000,000
# events over a live projection), for the estimate of the time left.
WEIGHTS = {"snapshot": 0.01, "scan": 0.35, "predictions": 0.2, "outputs": 0.01, "jobs": 0.2,
           "indexes": 0.07, "compare": 0.13, "write": 0.02, "cut-over": 0.01}
# Streams written per transaction by a replay in batches (each holds their advisory locks).
WRITE_BATCH = 500
# Held for the whole replay: a second one is refused while it runs.
_REPLAY_LOCK = 7_215_002
# Catch up again before comparing while the last round had more events than this.
_SMALL_DELTA = 2_000
# After the comparison, catch up again while a round saw more events than this: the cut-over
# folds in the rest with appends waiting.
_TINY_DELTA = 50
_CATCH_UP_ROUNDS = 4


# A full replay's disk use on the database server beside the store, at its peak: the scratch
# copy of the projections with its indexes, and the sort and hash files of the rebuild. Per
# event, and as a multiple of the live projections' size, whichever is greater (a new store
# has none). Measured with scripts/bench/scale.py (docs/deploy.md): over the live projection
# of 20M events (14.3 GB) the free disk fell by 27.7 GB at most, 1,385 bytes an event and
# 1.9 times the projections; about 950 bytes an event at 1M.
SCRATCH_BYTES_PER_EVENT = 1400
SCRATCH_PER_PROJECTION_BYTE = 2.0


@dataclass
class Space:
    """What a full replay needs on the database server's disk, and what is free there
    (None: not visible from this process: a remote server, or a role that may not see
    where its data lives)."""

    need: int
    free: int | None
    projections: int
    directory: str | None = None


def scratch_space(conn: psycopg.Connection) -> Space:
    row = conn.execute(queries["replay_space"]).fetchone()
    need = int(max(row["events"] * SCRATCH_BYTES_PER_EVENT,
                   row["projections_bytes"] * SCRATCH_PER_PROJECTION_BYTE))
    directory = row["data_directory"]
    host = conn.info.host or ""
    local = host.startswith("/") or host in ("localhost", "127.0.0.1", "::1")
    try:
        free = shutil.disk_usage(directory).free if directory and local else None
    except OSError:  # a path of the server's that this machine does not have
        free = None
    return Space(need, free, row["projections_bytes"], directory if free is not None else None)


class ReplayBusy(ServiceError):
    """Another replay is running."""

    code = "replay_busy"
    status = 409


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
    scratch: Scratch
    report: Progress
    started: float = field(default_factory=time.perf_counter)
    wall_started: float = field(default_factory=time.time)
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
           batches: int = 0, progress: Progress | None = None) -> ReplayResult:
    """Rebuild all projections (or one stream's) from events; with check, change nothing.

    With batches, the rows that differ are written before the cut-over, that many streams at
    a time (see _write_ahead; WRITE_BATCH is a good size): appends then never wait long
    however many rows differ (after a change of the fold's rules, every row may), but a
    replay stopped midway leaves the streams it wrote rebuilt and the others as they were;
    without it, a stopped replay leaves everything as it was.

    Runs on `conn`'s session (left as it was found, with no temporary tables, when done)
    and on a second session opened with the same parameters."""
    saved = conn.autocommit
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.rollback()
    conn.autocommit = True
    try:
        with _second_session(conn) as other, _exclusive(conn):
            schema = conn.execute("SELECT current_schema() AS s").fetchone()["s"]
            run = _Run(conn, other, None if stream is None else [stream], Scratch(conn, schema),
                       progress or (lambda step: None))
            try:
                return _replay(run, check, batches)
            finally:
                run.scratch.drop()
    finally:
        conn.autocommit = saved


def _replay(run: _Run, check: bool, batches: int) -> ReplayResult:
    _rebuild(run)
    _index(run)
    total, samples = _catch_up_and_compare(run)
    committed = bool(total) and not check
    if committed:
        total = _write_ahead(run, batches) + _cut_over(run)
    return ReplayResult(run.events, run.scratch.count("jobs"), run.scratch.count("predictions"),
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
    _announce(run.conn, run.streams, name, run.wall_started)
    started = time.perf_counter()
    try:
        yield
    finally:
        run.timings[name] = run.timings.get(name, 0.0) + time.perf_counter() - started


def _announce(conn: psycopg.Connection, streams: list[str] | None, stage: str,
              started: float | None = None) -> None:
    """Name the stage, and when the replay started (Unix seconds), in this session's
    application_name until the replay ends."""
    name = (f"rjs-replay:{'job' if streams else 'all'}:{STAGES.index(stage) + 1}:{len(STAGES)}:{stage}"
            f":{int(started or time.time())}")
    conn.execute("SELECT set_config('application_name', %s, false)", (name,))


def _quiesce(conn: psycopg.Connection, streams: list[str] | None) -> None:
    """Wait until no append is in flight (for these streams), and keep new ones waiting
    until the transaction ends."""
    if streams is None:
        conn.execute(queries["lock_events_for_replay"])
    else:
        conn.execute(queries["lock_streams"], {"streams": streams})


def _begin_quiet_snapshot(run: _Run) -> int:
    """Begin a REPEATABLE READ transaction on the replay's session, in a snapshot no
    append was in flight in; return the greatest position it holds."""
    with run.other.transaction():
        _quiesce(run.other, run.streams)
        exported = run.other.execute("SELECT pg_export_snapshot() AS s").fetchone()["s"]
        run.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        run.conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(exported)))
    return _newest_position(run.conn)


def _newest_position(conn: psycopg.Connection) -> int:
    return conn.execute(queries["newest_position"]).fetchone()["position"]


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
            run.scratch.create()
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


def _index(run: _Run) -> None:
    with _timed(run, "indexes"):
        run.scratch.index()
    run.stage("indexes")


def _count_events(run: _Run, after: int, upto: int) -> int:
    return run.conn.execute(queries["replay_event_count"],
                            {"after": after, "upto": upto, "streams": run.streams}).fetchone()["n"]


def _catch_up(run: _Run, upto: int, *, compare: bool = False) -> int:
    """Rebuild again, in the scratch tables, the streams with events in (watermark, upto];
    return how many such events there were. With compare, also list those streams' rows
    that differ from the live ones."""
    changed = run.conn.execute(queries["replay_changed_streams"],
                               {"after": run.watermark, "upto": upto, "streams": run.streams}).fetchone()
    if changed["n"]:
        run.conn.execute("SELECT clear_projections(%(s)s::text[])", {"s": changed["streams"]})
        for phase in PHASES:
            run.conn.execute(f"SELECT rebuild_{phase}(%(s)s::text[])", {"s": changed["streams"]})
        if compare:
            run.scratch.list_differences(changed["streams"])
    run.watermark = upto
    run.events += changed["n"]
    run.caught_up += changed["n"]
    return changed["n"]


def _catch_up_and_compare(run: _Run) -> tuple[int, list[Difference]]:
    """Catch up until few events came in during a round, then list every row that differs;
    then catch up again, listing only the changed streams' rows, until the events that
    arrive during a round are so few that the cut-over, which takes them under the lock,
    is short."""
    with _timed(run, "compare"):
        for _ in range(_CATCH_UP_ROUNDS):
            if _in_quiet_snapshot(run, lambda upto: _catch_up(run, upto)) <= _SMALL_DELTA:
                break
        _in_quiet_snapshot(run, lambda upto: _list_all(run, upto))
        for _ in range(_CATCH_UP_ROUNDS):
            if _in_quiet_snapshot(run, lambda upto: _catch_up(run, upto, compare=True)) <= _TINY_DELTA:
                break
        total, samples = run.scratch.differences()
    run.stage("compare", total)
    return total, samples


def _in_quiet_snapshot(run: _Run, work: Callable[[int], int]) -> int:
    """Run work(greatest position) in a transaction in a quiet snapshot; return its result."""
    upto = _begin_quiet_snapshot(run)
    try:
        result = work(upto)
        run.conn.execute("COMMIT")
        return result
    except BaseException:
        run.conn.execute("ROLLBACK")
        raise


def _list_all(run: _Run, upto: int) -> int:
    caught_up = _catch_up(run, upto)
    run.scratch.clear_differences()
    run.scratch.list_differences(run.streams)
    return caught_up


def _cut_over(run: _Run) -> int:
    """The short transaction: fold in what arrived since the comparison, then write only
    the rows that differ. Returns how many rows were inserted, updated or deleted."""
    with _timed(run, "cut-over"), run.conn.transaction():
        _quiesce(run.conn, run.streams)
        _catch_up(run, _newest_position(run.conn), compare=True)
        run.scratch.live_names_first()
        changed = run.scratch.apply()
    run.stage("cut-over", changed)
    return changed


def _write_ahead(run: _Run, batches: int) -> int:
    """In batches, write the differing rows before the cut-over, some streams at a time:
    each batch under its streams' advisory locks (appends to other streams go on), and only
    for streams with no event since the comparison (the cut-over takes the others). Each
    stream's rows change in one transaction, so none is ever shown half rebuilt. First, in
    batches or not, the log tails of the rows to be written are read again (restore_ahead)."""
    written = 0
    with _timed(run, "write"):
        run.scratch.restore_ahead()
        if batches:
            streams = run.scratch.streams_differing()
            for lo in range(0, len(streams), batches):
                written += _write_batch(run, streams[lo:lo + batches])
    run.stage("write", written)
    return written


def _write_batch(run: _Run, streams: list[str]) -> int:
    with run.conn.transaction():
        _quiesce(run.conn, streams)
        moved = set(run.conn.execute(queries["replay_changed_streams"], {
            "after": run.watermark, "upto": _newest_position(run.conn), "streams": streams,
        }).fetchone()["streams"] or ())
        ready = [s for s in streams if s not in moved]
        run.scratch.live_names_first()
        written = run.scratch.apply(ready)
        run.scratch.forget(ready)
    return written
