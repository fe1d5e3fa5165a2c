"""The replay runs beside the live projection: appends go on while it rebuilds, it misses no
event, it changes nothing when it is killed, and two cannot run at once."""

from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest

from service import db, replay
from tests.conftest import new_job_id
from tests.test_replay import random_workload, snapshot
from tests.workload import LIFECYCLE, bodies, create_job, webhook

ALL = ("jobs", "predictions", "outputs", "job_activity")


def everything(conn) -> dict[str, list[dict]]:
    rows = snapshot(conn)
    rows["job_activity"] = conn.execute("SELECT * FROM job_activity ORDER BY job_id").fetchall()
    return rows


def stop_the_world(conn) -> dict[str, list[dict]]:
    """What a rebuild in place gives, appends shut out: the live rows it would write, read
    inside a transaction that is then rolled back."""
    with conn.transaction() as tx:
        conn.execute("LOCK TABLE events IN SHARE MODE")
        conn.execute("SELECT clear_projections(NULL)")
        for phase in replay.PHASES:
            conn.execute(f"SELECT rebuild_{phase}(NULL)")
        rows = everything(conn)
        raise psycopg.Rollback(tx)
    return rows


class Appender(threading.Thread):
    """Appends webhooks for old and new jobs, each in its own commit, until stopped; notes
    when each one was acknowledged."""

    def __init__(self, url: str, old_jobs: list[str], seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.old_jobs, self.rng = url, old_jobs, random.Random(seed)
        self.stopping = threading.Event()
        self.acknowledged: list[float] = []
        self.seed = seed

    def run(self) -> None:
        with db.connect(self.url, autocommit=True) as conn:
            n = 0
            while not self.stopping.is_set():
                n += 1
                if self.rng.random() < 0.5:
                    job = self.rng.choice(self.old_jobs)
                else:
                    job = new_job_id()
                    create_job(conn, job)
                pid = f"live{self.seed}x{n}"
                for k, body in enumerate(bodies(LIFECYCLE, pid)):
                    webhook(conn, job, body, key=f"msg_live_{self.seed}_{n}_{k}")
                    self.acknowledged.append(time.monotonic())


@pytest.mark.parametrize("batches", [0, 7], ids=["one cut-over", "in batches"])
def test_a_replay_while_webhooks_keep_coming_equals_a_stop_the_world_rebuild(conn, db_url, batches):
    jobs = random_workload(conn, random.Random(21), jobs=150)
    # Something for the cut-over to correct, in rows that appends are also changing.
    conn.execute("UPDATE jobs SET outputs_processed = 77 WHERE id = ANY (%s::uuid[])", (jobs[:10],))
    conn.execute("DELETE FROM predictions WHERE id IN ('p3x0', 'p4x0')")
    appenders = [Appender(db_url, jobs, seed) for seed in (1, 2)]
    for a in appenders:
        a.start()
    while sum(len(a.acknowledged) for a in appenders) < 20:
        time.sleep(0.01)
    stages: dict[str, float] = {}
    result = replay.replay(conn, batches=batches,
                           progress=lambda step: stages.setdefault(step.stage, time.monotonic()))
    for a in appenders:
        a.stopping.set()
        a.join()
    assert result.committed and result.differences > 0
    assert result.caught_up > 0  # webhooks were recorded during the replay and folded in
    # Appends were acknowledged while the replay rebuilt, not only before and after it.
    during = [t for a in appenders for t in a.acknowledged if stages["snapshot"] < t < stages["compare"]]
    assert len(during) > 0
    live = everything(conn)
    assert live == stop_the_world(conn)
    assert replay.replay(conn, check=True).differences == 0


def test_an_event_whose_position_was_taken_before_the_snapshot_is_not_missed(conn, db_url):
    """A transaction holds position P, uncommitted; a later one takes P+1 and commits. The
    greatest committed position is then P+1 while P is still to come: a replay that read
    "everything up to the greatest position" and caught up above it would skip P."""
    early, late = new_job_id(), new_job_id()
    create_job(conn, early)
    create_job(conn, late)
    holding = db.connect(db_url)
    states = bodies(LIFECYCLE, "held1")
    held = webhook(holding, early, states[-1], key="msg_held")  # position P, not committed
    after = webhook(conn, late, bodies(LIFECYCLE, "after1")[-1], key="msg_after")
    assert after.position > held.position
    outcome: dict = {}
    replaying = threading.Thread(target=lambda: outcome.update(result=replay.replay(conn)))
    replaying.start()
    time.sleep(0.5)
    assert replaying.is_alive()  # the snapshot waits for the append in flight
    holding.commit()
    holding.close()
    replaying.join(30)
    assert "result" in outcome
    shown = conn.execute("SELECT status FROM predictions WHERE id = 'held1'").fetchone()
    assert shown == {"status": "succeeded"}
    assert everything(conn) == stop_the_world(conn)


def _corrupt(conn, jobs: list[str]) -> dict[str, list[dict]]:
    conn.execute("UPDATE jobs SET outputs_processed = 99 WHERE id = %s", (jobs[0],))
    conn.execute("DELETE FROM predictions WHERE id = 'p2x0'")
    return everything(conn)


def _my_temp_tables(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM pg_class WHERE relnamespace = pg_my_temp_schema()"
                        ).fetchone()["n"]


class Stop(Exception):
    pass


@pytest.mark.parametrize("stage", replay.STAGES[:-1])
def test_a_replay_that_fails_in_any_stage_changes_nothing(conn, stage):
    before = _corrupt(conn, random_workload(conn, random.Random(4)))

    def fail(step: replay.Step) -> None:
        if step.stage == stage:
            raise Stop(stage)
    with pytest.raises(Stop):
        replay.replay(conn, progress=fail)
    assert everything(conn) == before
    assert _my_temp_tables(conn) == 0
    assert replay.replay(conn).committed  # the lock was released, and the next one works
    assert everything(conn) != before


@pytest.mark.parametrize("stage", replay.STAGES[:-1])
def test_a_replay_whose_session_is_killed_in_any_stage_changes_nothing(conn, db_url, stage):
    before = _corrupt(conn, random_workload(conn, random.Random(6)))
    replaying = db.connect(db_url, autocommit=True)

    def kill(step: replay.Step) -> None:
        if step.stage == stage:
            conn.execute("SELECT pg_terminate_backend(%s)", (replaying.info.backend_pid,))
    with pytest.raises(psycopg.OperationalError):
        replay.replay(replaying, progress=kill)
    assert everything(conn) == before
    assert replay.replay(conn).committed
    assert everything(conn) == stop_the_world(conn)


def test_a_replay_killed_inside_its_cut_over_changes_nothing(conn, db_url):
    jobs = random_workload(conn, random.Random(8))
    before = _corrupt(conn, jobs)
    blocker = db.connect(db_url)
    blocker.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (jobs[0],))  # held
    replaying = db.connect(db_url, autocommit=True)
    outcome: dict = {}

    def run() -> None:
        try:
            replay.replay(replaying)
        except psycopg.OperationalError as exc:
            outcome["error"] = exc
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["unexpected"] = exc
    thread = threading.Thread(target=run)
    thread.start()
    wait_until_waiting(conn, replaying.info.backend_pid, "cut-over")  # on the row we hold
    conn.execute("SELECT pg_terminate_backend(%s)", (replaying.info.backend_pid,))
    thread.join(30)
    blocker.rollback()
    blocker.close()
    assert "error" in outcome
    assert everything(conn) == before


def test_a_second_replay_is_refused_while_one_runs(conn, db_url):
    random_workload(conn, random.Random(9), jobs=3)
    refused: list[str] = []

    def second(step: replay.Step) -> None:
        if step.stage == "predictions":
            with db.connect(db_url, autocommit=True) as other:
                with pytest.raises(replay.ReplayBusy) as busy:
                    replay.replay(other, check=True)
                refused.append(str(busy.value))
    replay.replay(conn, check=True, progress=second)
    assert refused and refused[0].startswith("another replay is running (server process ")
    assert replay.replay(conn, check=True).differences == 0  # and one may run after it


def test_one_job_replay_leaves_other_streams_appending(conn, db_url):
    jobs = random_workload(conn, random.Random(10), jobs=4)
    conn.execute("UPDATE jobs SET status = 'failed' WHERE id = ANY (%s::uuid[])", (jobs[:2],))
    result = replay.replay(conn, stream=jobs[0])
    assert result.committed and result.differences == 1 and result.jobs == 1
    statuses = {r["id"]: r["status"] for r in conn.execute("SELECT id::text, status FROM jobs")}
    assert statuses[jobs[1]] == "failed"  # not replayed
    assert statuses[jobs[0]] != "failed"


def test_the_command_prints_each_stage_with_its_rate_and_the_cut_over(app, conn):
    random_workload(conn, random.Random(12), jobs=3)
    conn.execute("UPDATE predictions SET status = 'starting'")
    done = app.test_cli_runner().invoke(args=["replay"])
    assert done.exit_code == 0, done.output
    for number, stage in enumerate(replay.STAGES, 1):
        assert f"[{number}/{len(replay.STAGES)}] {stage}:" in done.output
    assert "events/s, about" in done.output
    assert "rows corrected in a cut-over of" in done.output


def test_a_replay_in_batches_stopped_midway_leaves_each_job_whole(conn, db_url):
    """In batches, what was written before the stop is rebuilt stream by stream: each job
    is either as it was or as a rebuild has it, never half of each."""
    jobs = sorted(random_workload(conn, random.Random(14), jobs=30))
    conn.execute("UPDATE jobs SET outputs_processed = 99")
    conn.execute("UPDATE predictions SET logs_tail = 'tampered' WHERE job_id IS NOT NULL")
    blocker = db.connect(db_url)  # holds the stream lock of a job in the third batch of 5
    blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (jobs[12],))
    replaying = db.connect(db_url, autocommit=True)
    thread = threading.Thread(target=lambda: pytest.raises(psycopg.OperationalError, replay.replay,
                                                           replaying, batches=5))
    thread.start()
    wait_until_waiting(conn, replaying.info.backend_pid, "write")
    conn.execute("SELECT pg_terminate_backend(%s)", (replaying.info.backend_pid,))
    thread.join(30)
    blocker.rollback()
    truth = stop_the_world(conn)
    live = everything(conn)
    rebuilt = {str(r["id"]) for r in live["jobs"] if r["outputs_processed"] != 99}
    assert rebuilt == set(jobs[:10])  # the first two batches, whole
    for table, key in (("jobs", "id"), ("predictions", "id")):
        expected = {r[key]: r for r in truth[table]}
        for row in live[table]:
            job = str(row["id"] if table == "jobs" else row["job_id"])
            if job in rebuilt:
                assert row == expected[row[key]]
            elif row.get("job_id", True):
                assert row["outputs_processed" if table == "jobs" else "logs_tail"] in (99, "tampered")


def wait_until_waiting(conn, pid: int, stage: str) -> None:
    """Until the session `pid` waits on a lock in the named stage of a replay."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = conn.execute("SELECT wait_event_type, application_name FROM pg_stat_activity "
                           "WHERE pid = %s", (pid,)).fetchone()
        if row and row["wait_event_type"] == "Lock" and f":{stage}:" in row["application_name"]:
            return
        time.sleep(0.02)
    pytest.fail(f"the replay never waited in its {stage} stage")
