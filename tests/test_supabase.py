"""sql/supabase_security.sql and migration 009 on a database laid out like a Supabase project
(tests/supabase.py): privileges, row-level security checked the way PostgREST runs requests,
the Realtime publication, and job broadcasts."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from service import commands, db, migrations, replay
from tests.supabase import OWNER, acting_as, user_claims
from tests.workload import LIFECYCLE, bodies, process_output, submit, webhook

ALICE = "6f1c3a0e-1d2b-4c5d-8e9f-0a1b2c3d4e5f"
BOB = "0b7e6d5c-4a39-4281-9f0e-1d2c3b4a5968"
SPEC = {"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse"}, "count": 1}


@pytest.fixture
def sb(supabase_url: str) -> Iterator[psycopg.Connection]:
    """A superuser connection to a fresh Supabase-like project (each statement commits)."""
    with db.connect(supabase_url, autocommit=True) as conn:
        yield conn


def finished_job(conn: psycopg.Connection, owner: str | None, prediction: str) -> str:
    """A job of `owner` through to one processed output, as the service records it."""
    job_id, _ = commands.create_job(conn, SPEC, owner_id=owner)
    states = bodies(LIFECYCLE, prediction)
    submit(conn, job_id, states[0])
    for n, body in enumerate(states[1:]):
        webhook(conn, job_id, body, key=f"msg_{prediction}_{n}")
    process_output(conn, job_id, prediction, 0)
    return job_id


def ids(conn: psycopg.Connection, sql: str) -> set[str]:
    return {str(next(iter(row.values()))) for row in conn.execute(sql).fetchall()}


def test_the_migrations_were_applied_by_an_owner_that_is_not_a_superuser(sb):
    owner = sb.execute("SELECT relowner::regrole::text AS o FROM pg_class WHERE relname = 'events'"
                       ).fetchone()["o"]
    assert owner == OWNER
    assert sb.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (OWNER,)).fetchone() == {
        "rolsuper": False}
    versions = [r["version"] for r in sb.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in migrations.discover()] and "009_supabase" in versions


def test_anon_has_no_privilege_on_anything_of_ours(sb):
    """Every table, view and sequence of the schema, including any a later migration adds."""
    granted = sb.execute("""
        SELECT c.relname, p.privilege_type FROM pg_class c
        CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) AS p(privilege_type)
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'p')
          AND c.relname <> 'other_app_table'
          AND (has_table_privilege('anon', c.oid, p.privilege_type)
               OR has_any_column_privilege('anon', c.oid, 'SELECT'))
        UNION ALL
        SELECT c.relname, 'USAGE' FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'S'
          AND CASE WHEN c.relkind = 'S' THEN has_sequence_privilege('anon', c.oid, 'USAGE') END""").fetchall()
    assert granted == []
    untouched = sb.execute("SELECT has_table_privilege('anon', 'other_app_table', 'SELECT') AS s, "
                           "has_table_privilege('authenticated', 'other_app_table', 'DELETE') AS d"
                           ).fetchone()
    assert untouched == {"s": True, "d": True}, "another table of the project keeps its grants"
    tables = sb.execute("""SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace
                           AND relkind = 'r' AND NOT relrowsecurity AND relname <> 'other_app_table'
                        """).fetchall()
    assert tables == [], "every table has row-level security on"


def test_anon_sees_nothing(sb):
    finished_job(sb, ALICE, "p_alice")
    for table in ("jobs", "predictions", "outputs", "events"):
        with acting_as(sb, "anon"), pytest.raises(psycopg.errors.InsufficientPrivilege):
            sb.execute(f"SELECT count(*) FROM {table}")


def test_a_user_sees_only_their_own_jobs_predictions_and_outputs(sb):
    alice_job = finished_job(sb, ALICE, "p_alice")
    bob_job = finished_job(sb, BOB, "p_bob")
    finished_job(sb, None, "p_key")  # an API-key job: no user's
    for user, job, prediction in ((ALICE, alice_job, "p_alice"), (BOB, bob_job, "p_bob")):
        with acting_as(sb, "authenticated", user_claims(user)):
            assert ids(sb, "SELECT id FROM jobs") == {job}
            assert ids(sb, "SELECT id FROM predictions") == {prediction}
            assert ids(sb, "SELECT prediction_id FROM outputs") == {prediction}
            row = sb.execute("SELECT id, owner_id, status FROM jobs").fetchone()
            assert (str(row["owner_id"]), row["status"]) == (user, "completed")
    with acting_as(sb, "authenticated", user_claims("11111111-2222-4333-8444-555555555555")):
        assert sb.execute("SELECT count(*) AS n FROM jobs").fetchone()["n"] == 0


def test_a_user_reads_only_the_columns_a_page_shows(sb):
    finished_job(sb, ALICE, "p_alice")
    with acting_as(sb, "authenticated", user_claims(ALICE)):
        assert sb.execute("SELECT status FROM predictions").fetchone() == {"status": "succeeded"}
    for column in ("jobs.input", "jobs.submit_failures", "job_activity.event_count",
                   "predictions.logs_tail", "predictions.state_key"):
        table, name = column.split(".")
        with acting_as(sb, "authenticated", user_claims(ALICE)), \
                pytest.raises(psycopg.errors.InsufficientPrivilege):
            sb.execute(f"SELECT {name} FROM {table}")


def test_no_user_reads_or_writes_events_or_the_projections(sb):
    finished_job(sb, ALICE, "p_alice")
    for statement in ("SELECT count(*) FROM events",
                      "INSERT INTO events (event_key, stream, type, data) "
                      "VALUES ('k', 's', 'job.canceled', '{}')",
                      "UPDATE jobs SET status = 'failed'", "DELETE FROM predictions",
                      "SELECT count(*) FROM tasks", "SELECT count(*) FROM job_timeline"):
        with acting_as(sb, "authenticated", user_claims(ALICE)), \
                pytest.raises(psycopg.errors.InsufficientPrivilege):
            sb.execute(statement)


@pytest.mark.parametrize("statement", ["UPDATE events SET type = 'job.canceled'",
                                       "DELETE FROM events", "TRUNCATE events"])
def test_events_stay_immutable_for_the_service_role_and_the_owner(sb, statement):
    finished_job(sb, ALICE, "p_alice")
    with acting_as(sb, "service_role"):
        assert sb.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == 6
        assert sb.execute("SELECT count(*) AS n FROM jobs").fetchone()["n"] == 1  # bypasses RLS
        sb.execute("INSERT INTO events (event_key, stream, type, data) "
                   "VALUES ('k', 's', 'job.canceled', '{}')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            sb.execute(statement)
    with acting_as(sb, OWNER), pytest.raises(psycopg.errors.InsufficientPrivilege,
                                             match="events is append-only"):
        sb.execute(statement)


def test_jobs_and_predictions_join_the_publication_without_removing_other_tables(sb):
    published = sb.execute("SELECT tablename FROM pg_publication_tables "
                           "WHERE pubname = 'supabase_realtime' ORDER BY 1").fetchall()
    assert [r["tablename"] for r in published] == ["jobs", "other_app_table", "predictions"]
    identity = sb.execute("SELECT relname, relreplident FROM pg_class "
                          "WHERE relname IN ('jobs', 'predictions') ORDER BY 1").fetchall()
    assert [r["relreplident"] for r in identity] == ["d", "d"]  # primary key, not FULL


def test_the_owner_is_rebuilt_by_replay(sb):
    finished_job(sb, ALICE, "p_alice")
    sb.execute("UPDATE jobs SET owner_id = NULL")  # as a projection written wrongly would be
    result = replay.replay(sb, check=True)
    assert [str(d) for d in result.samples] == [f"jobs {d.key[0]}: changed (owner_id)"
                                                for d in result.samples]
    assert result.differences == 1
    replay.replay(sb)
    assert str(sb.execute("SELECT owner_id FROM jobs").fetchone()["owner_id"]) == ALICE


def broadcasts(conn: psycopg.Connection) -> list[dict]:
    return conn.execute("SELECT topic_name, operation, new, old FROM realtime.broadcast_calls "
                        "ORDER BY id").fetchall()


def test_job_changes_are_broadcast_to_the_jobs_topic_and_log_lines_are_not(sb):
    job_id, _ = commands.create_job(sb, SPEC, owner_id=ALICE)
    states = bodies(LIFECYCLE, "p1")
    submit(sb, job_id, states[0])                       # pending -> queued
    webhook(sb, job_id, states[1], key="m1")            # queued -> running
    webhook(sb, job_id, states[2], key="m2")            # more logs: nothing a page shows
    sent = broadcasts(sb)
    assert [(b["topic_name"], b["operation"], b["new"]["status"]) for b in sent] == [
        (f"job:{job_id}", "UPDATE", "queued"), (f"job:{job_id}", "UPDATE", "running")]
    assert sent[1]["old"]["status"] == "queued"
    assert set(sent[1]["new"]) == {"id", "owner_id", "status", "predictions_expected",
                                   "predictions_succeeded", "predictions_failed", "outputs_processed",
                                   "outputs_failed", "error", "completed_at"}


def test_only_the_owner_may_receive_a_jobs_broadcast(sb):
    job = finished_job(sb, ALICE, "p_alice")
    for user, expected in ((ALICE, True), (BOB, False)):
        with acting_as(sb, "authenticated", user_claims(user)):
            sb.execute("SELECT set_config('realtime.topic', %s, true)", (f"job:{job}",))
            n = sb.execute("SELECT count(*) AS n FROM realtime.messages").fetchone()["n"]
            assert (n > 0) is expected
