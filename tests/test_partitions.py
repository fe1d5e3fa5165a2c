"""events range-partitioned by position (migration 017): keys unique forever through
event_keys, partitions kept ahead of the appends, and an append past the last partition."""

from __future__ import annotations

import psycopg
import pytest

from service import events, replay, store
from service.db import queries
from tests.conftest import new_job_id
from tests.test_migrations import rows
from tests.workload import LIFECYCLE, bodies, create_job, submit, webhook

SIZE = 1_000_000


def partitions(conn) -> list[dict]:
    return conn.execute("SELECT * FROM event_partitions").fetchall()


def jump_to(conn, position: int) -> None:
    """The next append takes this position, as if the store held that many events."""
    conn.execute("SELECT setval('events_position_seq', %s, false)", (position,))


def where(conn, position: int) -> str:
    return conn.execute("SELECT tableoid::regclass::text AS p FROM events WHERE position = %s",
                        (position,)).fetchone()["p"]


def test_a_fresh_store_has_partitions_ahead_and_a_default(conn):
    names = [p["partition"] for p in partitions(conn)]
    assert names == ["store_partitions.events_000000", "store_partitions.events_000001",
                     "store_partitions.events_000002", "store_partitions.events_default"]
    assert [(p["from_position"], p["to_position"]) for p in partitions(conn)][:3] == [
        (0, SIZE), (SIZE, 2 * SIZE), (2 * SIZE, 3 * SIZE)]
    assert store.maintain_partitions(conn) == []  # nothing to do: two partitions ahead already


def test_a_duplicate_whose_first_copy_sits_in_an_old_partition_is_still_a_duplicate(conn):
    job = new_job_id()
    create_job(conn, job)
    states = bodies(LIFECYCLE, "p1")
    submit(conn, job, states[0])
    first = webhook(conn, job, states[1], key="msg_old")
    assert where(conn, first.position) == "store_partitions.events_000000"
    jump_to(conn, 2 * SIZE + 10)
    assert store.maintain_partitions(conn) == ["store_partitions.events_000003",
                                               "store_partitions.events_000004"]
    later = webhook(conn, job, states[2], key="msg_new")
    assert where(conn, later.position) == "store_partitions.events_000002"
    before = rows(conn)
    again = webhook(conn, job, dict(states[1], status="succeeded"), key="msg_old")
    assert (again.position, again.duplicate) == (first.position, True)
    assert rows(conn) == before  # recorded once, changed nothing
    assert conn.execute("SELECT count(*) AS n FROM events WHERE event_key = 'msg_old'").fetchone()["n"] == 1
    # and through the group commit, alone or beside a new webhook
    group = conn.execute("SELECT * FROM append_webhooks(%s::jsonb)", (psycopg.types.json.Jsonb([
        {"webhook_id": "msg_old", "job": job, "body": states[1], "metadata": {}},
        {"webhook_id": "msg_newer", "job": job, "body": states[3], "metadata": {}}]),)).fetchall()
    assert [(r["n"], r["duplicate"]) for r in group] == [(1, True), (2, False)]
    assert group[0]["event_position"] == first.position


def test_an_append_past_the_last_partition_succeeds_and_maintenance_moves_it(conn, client):
    job = new_job_id()
    create_job(conn, job)
    states = bodies(LIFECYCLE, "p1")
    submit(conn, job, states[0])
    jump_to(conn, 7 * SIZE + 5)  # far past events_000002, and maintenance has not run
    late = [webhook(conn, job, body, key=f"late_{n}") for n, body in enumerate(states[1:])]
    assert {where(conn, a.position) for a in late} == {"store_partitions.events_default"}
    before = rows(conn)
    listed = client.get(f"/api/jobs/{job}/events").get_json()["events"]
    assert [e["position"] for e in listed][-len(late):] == [a.position for a in late]
    assert replay.replay(conn, check=True).differences == 0

    created = store.maintain_partitions(conn)
    assert created == [f"store_partitions.events_{n:06d}" for n in range(3, 10)]
    assert {where(conn, a.position) for a in late} == {"store_partitions.events_000007"}
    assert conn.execute("SELECT count(*) AS n FROM store_partitions.events_default").fetchone()["n"] == 0
    assert rows(conn) == before  # every event and every projection row as they were
    assert client.get(f"/api/jobs/{job}/events").get_json()["events"] == listed
    # the next append goes to a partition of its own, and the key table still refuses repeats
    after = webhook(conn, job, states[-1], key="after")
    assert where(conn, after.position) == "store_partitions.events_000007"
    assert webhook(conn, job, states[1], key="late_0").duplicate


def test_a_replay_reads_every_partition_in_order(conn):
    for n in range(3):  # a job in each of three partitions, the last one's webhooks in a fourth
        jump_to(conn, n * SIZE + 1)
        job = new_job_id()
        create_job(conn, job)
        states = bodies(LIFECYCLE, f"pred{n}")
        submit(conn, job, states[0])
        if n == 2:
            jump_to(conn, 3 * SIZE + 1)
            store.maintain_partitions(conn)
        for k, body in enumerate(states[1:]):
            webhook(conn, job, body, key=f"msg_{n}_{k}")
    held = conn.execute("SELECT DISTINCT tableoid::regclass::text AS p FROM events ORDER BY 1").fetchall()
    assert [r["p"] for r in held] == [f"store_partitions.events_{n:06d}" for n in range(4)]
    before = rows(conn)
    assert replay.replay(conn, check=True).differences == 0
    conn.execute("TRUNCATE jobs, predictions, outputs, job_activity")
    result = replay.replay(conn)
    assert result.events == len(before["events"]) and len(before["jobs"]) == 3
    assert rows(conn) == before


def test_one_jobs_events_are_read_from_its_partitions_only(conn):
    old = new_job_id()
    create_job(conn, old)
    jump_to(conn, 2 * SIZE + 1)
    job = new_job_id()
    create_job(conn, job)
    plan = conn.execute("EXPLAIN (ANALYZE, COSTS OFF, FORMAT JSON) " + queries["job_events"],
                        events.job_stream(conn, job)).fetchone()["QUERY PLAN"]
    text = str(plan)
    assert "events_000002" in text
    assert "events_000000" not in text and "events_000001" not in text


def plan_nodes(plan) -> list[dict]:
    found, nodes = [], [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        found.append(node)
        nodes.extend(node.get("Plans", []))
    return found


def partitions_in(plan, read_only: bool = False) -> set[str]:
    """The partitions of events a plan (EXPLAIN ANALYZE, JSON) kept, or (read_only) read."""
    return {n["Relation Name"] for n in plan_nodes(plan) if n.get("Relation Name", "").startswith("events_")
            and (not read_only or n.get("Actual Loops", 0) > 0)}


def pruned_at_run_time(plan) -> int:
    """How many partitions the plan had but left out as it ran: the planner planned them all."""
    return sum(n.get("Subplans Removed", 0) for n in plan_nodes(plan))


def test_an_old_jobs_events_are_read_without_probing_the_newer_partitions(conn, client):
    old = new_job_id()
    create_job(conn, old)
    states = bodies(LIFECYCLE, "p_old")
    submit(conn, old, states[0])
    for n, body in enumerate(states[1:]):
        webhook(conn, old, body, key=f"old_{n}")
    jump_to(conn, SIZE + 5)
    newer = new_job_id()
    create_job(conn, newer)
    jump_to(conn, 2 * SIZE + 5)
    webhook(conn, newer, bodies(LIFECYCLE, "p_new")[1], key="new_1")
    explain = "EXPLAIN (ANALYZE, COSTS OFF, FORMAT JSON) "
    bounds = events.job_stream(conn, old)
    # each read of one job's events is planned on its partition only, not just run on it
    for name, params in [("job_events", {}), ("submission_slots", {}), ("job_created_data", {}),
                         ("latest_retry", {}),
                         ("prediction_for_slot", {"step": "1", "index": "0", "retry": "0"}),
                         ("retryable_predictions", {"job_id": old}),
                         ("job_view", {"id": old, "owner": None})]:
        plan = conn.execute(explain + queries[name], bounds | params).fetchone()["QUERY PLAN"]
        assert partitions_in(plan) == {"events_000000"}, name
        assert pruned_at_run_time(plan) == 0, name
    # a job whose events span partitions reads each of them, and all its events
    plan = conn.execute(explain + queries["job_events"],
                        events.job_stream(conn, newer)).fetchone()["QUERY PLAN"]
    assert partitions_in(plan) == {"events_000001", "events_000002"}
    assert [e["event_key"] for e in client.get(f"/api/jobs/{newer}/events").get_json()["events"]] == [
        f"created:{newer}", "new_1"]
    assert len(client.get(f"/api/jobs/{old}/events").get_json()["events"]) == len(states) + 1
    # the list reads each job's retries from its own partitions, however many jobs
    listing = queries["list_jobs"]
    plan = conn.execute(explain + listing, {"status": None, "model": None, "owner": None,
                                            "after_created_at": None, "after_id": None,
                                            "limit": 10}).fetchone()["QUERY PLAN"]
    assert partitions_in(plan, read_only=True) == {"events_000000", "events_000001", "events_000002"}
    # no job_activity row (a stream that is no job's): no upper bound, nothing left out
    assert conn.execute("SELECT job_last_position('p_old') = 9223372036854775807 AS unbounded, "
                        "job_last_position(%s) = (SELECT max(position) FROM events WHERE stream = %s) "
                        "AS last", (old, old)).fetchone() == {"unbounded": True, "last": True}


EVENT_KEY_SCANS = """
    SELECT pg_stat_get_xact_numscans('event_keys'::regclass)
           + (SELECT coalesce(sum(pg_stat_get_xact_numscans(i.indexrelid)), 0) FROM pg_index i
              WHERE i.indrelid = 'event_keys'::regclass) AS n"""


def test_a_jobs_bounds_come_from_its_job_activity_row_alone(conn):
    """Both bounds of a read of one job's events are in the job's job_activity row: reading
    them looks up no key in event_keys, whose index (a key per event) is deeper than
    job_activity's (a row per job), so a cold read of an old job reads fewer blocks."""
    job = new_job_id()
    created = create_job(conn, job)
    states = bodies(LIFECYCLE, "p_bounds")
    webhook(conn, job, states[1], key="bounds_1")
    last = webhook(conn, job, states[2], key="bounds_2")
    with conn.transaction():
        before = conn.execute(EVENT_KEY_SCANS).fetchone()["n"]
        bounds = events.job_stream(conn, job)
        assert conn.execute(EVENT_KEY_SCANS).fetchone()["n"] == before
    assert (bounds["lo"], bounds["hi"]) == (created.position, last.position)
    assert conn.execute("SELECT job_first_position(%s) AS lo, job_last_position(%s) AS hi",
                        (job, job)).fetchone() == {"lo": bounds["lo"], "hi": bounds["hi"]}
    # no bounds for a stream that is no job's, nor below a job's events before its job.created
    unbounded = 2 ** 63 - 1
    assert events.job_stream(conn, "p_orphan") == {"stream": "p_orphan", "lo": 0, "hi": unbounded}
    early = new_job_id()
    first = webhook(conn, early, bodies(LIFECYCLE, "p_early")[1], key="early_1")
    assert events.job_stream(conn, early) == {"stream": early, "lo": 0, "hi": first.position}
    create_job(conn, early)
    assert events.job_stream(conn, early)["lo"] > first.position
    # the rebuild writes the same bounds
    assert replay.replay(conn, check=True).differences == 0


def scans(conn) -> dict[str, int]:
    """Each partition's scans (its own and its indexes') so far in this transaction."""
    return {r["partition"]: r["n"] for r in conn.execute(
        "SELECT p.partition, pg_stat_get_xact_numscans(p.partition::regclass) "
        "  + (SELECT coalesce(sum(pg_stat_get_xact_numscans(i.indexrelid)), 0) FROM pg_index i "
        "     WHERE i.indrelid = p.partition::regclass) AS n FROM event_partitions p")}


def test_a_new_job_and_its_new_prediction_read_no_partition_older_than_the_job(conn):
    """Creating a job reads none of events' partitions (its stream has no other event), and the
    fold's look for a job.retried naming a prediction it hears of for the first time
    (sql/fold.sql: apply_prediction_event) reads the job's partitions only: unbounded,
    each was an index probe in every partition, as many as the store has."""
    create_job(conn, new_job_id())  # events_000000
    jump_to(conn, 2 * SIZE + 5)
    job = new_job_id()
    with conn.transaction():
        before = scans(conn)
        create_job(conn, job)  # events_000002
        created = scans(conn)
        webhook(conn, job, bodies(LIFECYCLE, "p_first")[1], key="first_of_p")
        after = scans(conn)
    assert [p for p in created if created[p] > before[p]] == []
    assert [p for p in after if after[p] > created[p]] == ["store_partitions.events_000002"]


@pytest.mark.parametrize("statement", ["UPDATE event_keys SET position = 0", "DELETE FROM event_keys",
                                       "TRUNCATE event_keys"])
def test_the_keys_are_as_immutable_as_the_events(conn, statement):
    create_job(conn, new_job_id())
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        conn.execute(statement)


def test_a_partition_refuses_updates_too(conn):
    create_job(conn, new_job_id())
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        conn.execute("UPDATE store_partitions.events_000000 SET type = 'job.canceled'")


def test_maintenance_gives_way_to_a_long_reader_instead_of_holding_appends_behind_it(conn, db_url):
    jump_to(conn, 2 * SIZE + 1)  # the next partition is due
    create_job(conn, new_job_id())
    with psycopg.connect(db_url) as reader:
        reader.execute("SELECT count(*) FROM events")  # a report, its transaction still open
        assert store.maintain_partitions(conn) == []  # gave up after the lock timeout
    assert store.maintain_partitions(conn) == ["store_partitions.events_000003",
                                               "store_partitions.events_000004"]
