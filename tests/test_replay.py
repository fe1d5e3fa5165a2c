from __future__ import annotations

import random

import pytest

from service import events, replay
from tests.conftest import new_job_id
from tests.workload import (
    CANCELED,
    FAILED,
    LIFECYCLE,
    bodies,
    create_job,
    deliveries,
    process_output,
    webhook,
)

PROJECTIONS = ("jobs", "predictions", "outputs")


def snapshot(conn) -> dict[str, list[dict]]:
    order = {"jobs": "id", "predictions": "id", "outputs": "prediction_id, index"}
    return {t: conn.execute(f"SELECT * FROM {t} ORDER BY {order[t]}").fetchall() for t in PROJECTIONS}


def random_workload(conn, rng: random.Random, jobs: int = 12) -> list[str]:
    """Jobs with 1-3 predictions each, random outcomes, shuffled duplicate deliveries,
    some processed outputs, a cancel, a submit failure and an orphan webhook."""
    job_ids = []
    for j in range(jobs):
        job = new_job_id()
        job_ids.append(job)
        n = rng.randint(1, 3)
        create_job(conn, job, count=n)
        for i in range(n):
            pid = f"p{j}x{i}"
            kind = rng.choice([LIFECYCLE, LIFECYCLE, FAILED, CANCELED])
            states = bodies(kind, pid)
            events.append(conn, key=f"submitted:{job}:1:{i}", stream=job, type="prediction.submitted",
                          data={"step": 1, "index": i, "prediction": states[0]})
            for key, body in deliveries(states[1:], rng):
                webhook(conn, job, body, key=key)
            if kind is LIFECYCLE and rng.random() < 0.7:
                for k, url in enumerate(states[-1]["output"]):
                    events.append(conn, key=f"processed:{pid}:{k}", stream=job, type="output.processed",
                                  data={"prediction_id": pid, "index": k, "source_url": url,
                                        "url": f"/files/{pid}-{k}.png", "width": 1024, "height": 1024})
        if rng.random() < 0.15:
            events.append(conn, key=f"canceled:{job}", stream=job, type="job.canceled", data={})
        if rng.random() < 0.15:
            events.append(conn, key=f"submit_failed:{job}:1:9", stream=job,
                          type="prediction.submit_failed", data={"step": 1, "index": 9, "error": "429"})
    orphan = bodies(["succeeded_sdxl_2024_list_output_nanosecond_timestamps"], "orphan1")[0]
    webhook(conn, None, orphan, key="msg_orphan")
    return job_ids


def test_replay_of_a_random_workload_equals_the_live_projection(conn):
    random_workload(conn, random.Random(7))
    live = snapshot(conn)
    result = replay.replay(conn, check=True)
    assert result.differences == 0, [str(d) for d in result.samples]
    assert result.jobs == len(live["jobs"]) and result.predictions == len(live["predictions"])
    assert result.events == conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"]
    assert snapshot(conn) == live


# The predictions' grouping in rebuild_scan, as sql/rebuild.sql writes it.
GROUPING = """
    SELECT f.id, max(f.state_key COLLATE "C"), count(*)
    FROM events e
    CROSS JOIN LATERAL prediction_facts(e.stream, e.type, e.data, e.metadata,
                                        e.position, e.recorded_at) f
    GROUP BY f.id"""
PARALLEL_ALWAYS = ("SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; "
                   "SET min_parallel_table_scan_size = 0; SET max_parallel_workers_per_gather = 2")


def test_rebuild_in_parallel_workers_equals_the_live_projection(conn):
    """prediction_facts must stay parallel-safe (no subquery referring to the event, such as
    an OFFSET 0 fence), or a full rebuild's grouping pass runs in one process; and the
    partial aggregates that workers compute must merge into what the live path folded."""
    random_workload(conn, random.Random(13))
    live = snapshot(conn)
    conn.execute(PARALLEL_ALWAYS)
    # the facts are computed below the Gather (in workers) only if they are grouped there
    plan = "\n".join(row["QUERY PLAN"] for row in conn.execute("EXPLAIN " + GROUPING))
    assert "Partial HashAggregate" in plan or "Partial GroupAggregate" in plan, plan
    result = replay.replay(conn, check=True)
    assert result.differences == 0, [str(d) for d in result.samples]
    assert snapshot(conn) == live


def test_replay_rebuilds_dropped_projections_row_for_row(conn):
    random_workload(conn, random.Random(11))
    live = snapshot(conn)
    conn.execute("DELETE FROM outputs; DELETE FROM predictions; DELETE FROM jobs")
    result = replay.replay(conn)
    assert result.committed
    assert result.differences == sum(len(rows) for rows in live.values())
    assert snapshot(conn) == live


@pytest.mark.parametrize("window", [1, 2, 5])
def test_a_rebuild_in_windows_of_a_few_positions_equals_the_live_projection(conn, window):
    """A full rebuild groups the store a window of positions at a time; with windows this
    small nearly every prediction's events lie in several, and their groups must merge
    into what the live path folded."""
    jobs = random_workload(conn, random.Random(17))
    # a job's statistics from events far apart: two final refusals (counted), a retry
    for index in (8, 9):
        events.append(conn, key=f"submit_failed:{jobs[0]}:1:{index}:final", stream=jobs[0],
                      type="prediction.submit_failed",
                      data={"step": 1, "index": index, "error": "422", "final": True, "round": 0,
                            "prediction_id": f"unsubmitted-{jobs[0]}-1-{index}"})
    events.append(conn, key=f"retried:{jobs[1]}:1", stream=jobs[1], type="job.retried",
                  data={"predictions": ["p1x0"]})
    timed = new_job_id()  # its deadline runs from its latest retry
    create_job(conn, timed, cancel_after="3600")
    for n in (1, 2):
        events.append(conn, key=f"retried:{timed}:{n}", stream=timed, type="job.retried",
                      data={"predictions": []})
    # outputs whose events lie far apart: a success then a failure recorded after it (the
    # success still wins), and a failure then a success of the same output (the success wins)
    [processed] = conn.execute("""
        SELECT prediction_id, index, job_id::text AS job FROM outputs
        WHERE status = 'processed' ORDER BY prediction_id, index LIMIT 1""").fetchall()
    failed = {"error": "could not download the output", "source_url": "https://replicate.delivery/x.png"}
    events.append(conn, key=f"failed-late:{processed['prediction_id']}:{processed['index']}",
                  stream=processed["job"], type="output.failed",
                  data={"prediction_id": processed["prediction_id"], "index": processed["index"], **failed})
    late = new_job_id()
    create_job(conn, late)
    events.append(conn, key=f"failed:{late}:0", stream=late, type="output.failed",
                  data={"prediction_id": f"{late}-p", "index": 0, **failed})
    for _ in range(3):  # a few events between the two
        create_job(conn, new_job_id())
    process_output(conn, late, f"{late}-p", 0)
    live = snapshot(conn)
    assert {(o["prediction_id"], o["index"], o["status"]) for o in live["outputs"]} >= {
        (processed["prediction_id"], processed["index"], "processed"), (f"{late}-p", 0, "processed")}
    activity = conn.execute("SELECT * FROM job_activity ORDER BY job_id").fetchall()
    assert conn.execute("SELECT submit_failures FROM jobs WHERE id = %s", (jobs[0],)).fetchone() == {
        "submit_failures": 2}
    split = conn.execute("""
        SELECT count(*) AS n FROM (
            SELECT FROM events WHERE type IN ('prediction.submitted', 'replicate.webhook')
            GROUP BY coalesce(data #>> '{prediction,id}', data ->> 'id')
            HAVING min(position) / %(w)s <> max(position) / %(w)s) p""", {"w": window}).fetchone()
    assert split["n"] >= 5  # predictions in several windows: their merge is what this exercises
    split = conn.execute("""
        SELECT count(*) AS n FROM (
            SELECT FROM events WHERE type IN ('output.processed', 'output.failed')
            GROUP BY data ->> 'prediction_id', data ->> 'index'
            HAVING min(position) / %(w)s <> max(position) / %(w)s) p""", {"w": window}).fetchone()
    assert split["n"] == 2  # and so are two outputs
    conn.execute("SELECT set_config('rjs.rebuild_window', %s, false)", (str(window),))
    conn.execute("DELETE FROM outputs; DELETE FROM predictions; DELETE FROM jobs; DELETE FROM job_activity")
    result = replay.replay(conn)
    assert result.committed
    assert snapshot(conn) == live
    assert conn.execute("SELECT * FROM job_activity ORDER BY job_id").fetchall() == activity


def test_check_catches_a_corrupted_row_and_changes_nothing(conn):
    jobs = random_workload(conn, random.Random(3))
    conn.execute("UPDATE jobs SET status = 'failed', outputs_processed = 99 WHERE id = %s", (jobs[0],))
    conn.execute("UPDATE predictions SET logs_tail = 'tampered' WHERE id = 'p1x0'")
    conn.execute("DELETE FROM outputs WHERE ctid = (SELECT min(ctid) FROM outputs)")
    corrupted = snapshot(conn)
    result = replay.replay(conn, check=True)
    assert result.differences == 3
    described = {str(d) for d in result.samples}
    assert f"jobs {jobs[0]}: changed (status, outputs_processed)" in described
    assert "predictions p1x0: changed (logs_tail)" in described
    assert any(d.table == "outputs" and d.kind == "only in rebuild" for d in result.samples)
    assert not result.committed
    assert snapshot(conn) == corrupted
    replay.replay(conn)
    assert replay.replay(conn, check=True).differences == 0


def test_over_a_live_projection_the_replay_writes_the_log_tails_it_compared_as_digests(conn):
    """Over a live projection the scratch copy keeps a digest of each log tail: a tampered
    tail and a missing prediction are still found, and what the replay writes back, or
    compares in its samples, is the tail itself, read again from its event (a sample of a
    row changed elsewhere names that column alone, not the tail as well)."""
    random_workload(conn, random.Random(5))
    live = snapshot(conn)
    logged = [r["id"] for r in live["predictions"] if r["logs_tail"]]
    conn.execute("UPDATE predictions SET logs_tail = 'tampered' WHERE id = %s", (logged[0],))
    conn.execute("DELETE FROM predictions WHERE id = %s", (logged[1],))
    conn.execute("UPDATE predictions SET error = 'tampered' WHERE id = %s", (logged[2],))
    assert logged[1] not in {r["id"] for r in snapshot(conn)["predictions"]}
    checked = replay.replay(conn, check=True)
    assert checked.differences == 3
    assert {str(d) for d in checked.samples} == {f"predictions {logged[0]}: changed (logs_tail)",
                                                   f"predictions {logged[1]}: only in rebuild",
                                                   f"predictions {logged[2]}: changed (error)"}
    result = replay.replay(conn)
    assert result.committed and result.differences == 3
    assert snapshot(conn) == live
    assert not conn.execute("SELECT current_setting('rjs.rebuild_logs', true) AS s").fetchone()["s"]


def test_events_recorded_before_job_created_count_as_they_would_in_a_rebuild(conn):
    job = new_job_id()
    running = bodies(LIFECYCLE, "early1")[1]
    assert running["status"] == "processing"
    webhook(conn, job, running, key="msg_early")  # in the job's stream, before its job.created
    create_job(conn, job)
    shown = conn.execute("SELECT status, predictions_submitted FROM jobs").fetchone()
    assert shown == {"status": "running", "predictions_submitted": 1}
    assert conn.execute("SELECT event_count FROM job_activity").fetchone() == {"event_count": 2}
    assert replay.replay(conn, check=True).differences == 0


def test_replay_of_one_job_touches_only_that_job(conn):
    jobs = random_workload(conn, random.Random(5))
    conn.execute("UPDATE jobs SET outputs_processed = 99 WHERE id = ANY(%s::uuid[])", (jobs[:2],))
    result = replay.replay(conn, stream=jobs[0])
    assert result.committed and result.differences == 1 and result.jobs == 1
    processed = {r["id"]: r["outputs_processed"] for r in
                 conn.execute("SELECT id::text, outputs_processed FROM jobs")}
    assert processed[jobs[0]] != 99
    assert processed[jobs[1]] == 99  # untouched: it was not replayed
    assert replay.replay(conn, check=True).differences == 1


def test_replay_of_an_orphan_stream(conn):
    orphan = bodies(["succeeded_sdxl_2024_list_output_nanosecond_timestamps"], "orphan9")[0]
    webhook(conn, None, orphan, key="msg_o9")
    conn.execute("UPDATE predictions SET status = 'processing'")
    result = replay.replay(conn, stream="orphan9")
    assert result.predictions == 1 and result.differences == 1
    assert conn.execute("SELECT status FROM predictions").fetchone()["status"] == "succeeded"


def test_the_replay_command_prints_a_summary_and_check_exits_non_zero(app, conn):
    random_workload(conn, random.Random(1), jobs=3)
    runner = app.test_cli_runner()
    ok = runner.invoke(args=["replay", "--check"])
    assert ok.exit_code == 0, ok.output
    assert "the live projection matches the events" in ok.output
    assert "events/s" in ok.output
    conn.execute("UPDATE predictions SET status = 'starting'")
    bad = runner.invoke(args=["replay", "--check"])
    assert bad.exit_code == 1
    assert "differences from the live projection; nothing changed" in bad.output
    fixed = runner.invoke(args=["replay"])
    assert fixed.exit_code == 0 and "rows corrected" in fixed.output
    assert runner.invoke(args=["replay", "--check"]).exit_code == 0
