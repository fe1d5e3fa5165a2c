"""Supabase Realtime's view of the database: the changes it would stream, decoded with
wal2json from a private PostgreSQL 15 cluster (wal_level = logical) that this module starts
and stops, laid out like a Supabase project (tests/supabase.py) and migrated unchanged.

Realtime reads a logical replication slot with wal2json, passing the tables of the
supabase_realtime publication as `add-tables`; the test reads the slot the same way. It
skips, saying why, where PostgreSQL 15 or wal2json is missing (scripts/setup_pg_tools.sh
installs the plugin as root); the shared server is never reconfigured for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest

from service import commands, db
from tests import pg15 as pg15_cluster
from tests.supabase import create_project
from tests.workload import LIFECYCLE, bodies, submit, webhook

ALICE = "6f1c3a0e-1d2b-4c5d-8e9f-0a1b2c3d4e5f"
SPEC = {"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse"}, "count": 1}


@pytest.fixture(scope="module")
def pg15() -> Iterator[str]:
    """A private PostgreSQL 15 with wal_level = logical (tests/pg15.py)."""
    reason = pg15_cluster.missing(wal2json=True)
    if reason:
        pytest.skip(f"Realtime test skipped: {reason}")
    with pg15_cluster.cluster(logical=True) as private:
        yield private.url()


@pytest.fixture(scope="module")
def project(pg15: str) -> str:
    url = pg15.rsplit("/", 1)[0] + "/project"
    create_project(pg15, url, "project")
    return url


@pytest.fixture
def slot(project: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection, and a wal2json slot created before the test's changes."""
    with db.connect(project, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('realtime_test', 'wal2json')")
        try:
            yield conn
        finally:
            conn.execute("SELECT pg_drop_replication_slot('realtime_test')")


def realtime_tables(conn: psycopg.Connection) -> str:
    """add-tables as Realtime builds it: the publication's tables, schema.table."""
    rows = conn.execute("SELECT schemaname, tablename FROM pg_publication_tables "
                        "WHERE pubname = 'supabase_realtime' ORDER BY 1, 2").fetchall()
    return ",".join(f"{r['schemaname']}.{r['tablename']}" for r in rows)


def changes(conn: psycopg.Connection, add_tables: str | None) -> list[dict]:
    """Consume the slot's changes, decoded as Realtime decodes them (wal2json format 2)."""
    options = ["format-version", "2", "include-pk", "true", "include-transaction", "false",
               "actions", "insert,update,delete"]
    if add_tables is not None:
        options += ["add-tables", add_tables]
    rows = conn.execute("SELECT data FROM pg_logical_slot_get_changes('realtime_test', NULL, NULL, "
                        + ", ".join(["%s"] * len(options)) + ")", options).fetchall()
    return [json.loads(r["data"]) for r in rows]


def peek_all(conn: psycopg.Connection) -> list[dict]:
    """Every change in the slot, unfiltered, without consuming it."""
    rows = conn.execute("SELECT data FROM pg_logical_slot_peek_changes('realtime_test', NULL, NULL, "
                        "'format-version', '2', 'include-transaction', 'false')").fetchall()
    return [json.loads(r["data"]) for r in rows]


def job_with_logs(conn: psycopg.Connection, log_lines: int) -> str:
    """A job that Replicate starts processing, then sends `log_lines` log-only webhooks for."""
    job_id, _ = commands.create_job(conn, SPEC, owner_id=ALICE)
    states = bodies(LIFECYCLE, f"p-{job_id[-12:]}")
    submit(conn, job_id, states[0])
    webhook(conn, job_id, states[1], key=f"{job_id}-running")
    for n in range(log_lines):
        body = dict(states[1], logs=states[1]["logs"] + f"\nstep {n}")
        webhook(conn, job_id, body, key=f"{job_id}-log-{n}")
    return job_id


def test_job_and_prediction_changes_are_streamed_and_events_are_not(slot):
    job_id = job_with_logs(slot, log_lines=2)
    everything = peek_all(slot)
    # events is written through its partitions (migration 017): the WAL names the partition
    written = {"events" if c["table"].startswith("events_0") else c["table"] for c in everything}
    assert written >= {"events", "jobs", "predictions", "tasks"}
    streamed = changes(slot, realtime_tables(slot))
    tables = {c["table"] for c in streamed}
    assert tables == {"jobs", "predictions"}
    job_changes = [c for c in streamed if c["table"] == "jobs"]
    assert job_changes[0]["action"] == "I"
    ids = {col["value"] for c in job_changes for col in c["columns"] if col["name"] == "id"}
    assert ids == {job_id}
    statuses = [col["value"] for c in job_changes for col in c["columns"] if col["name"] == "status"]
    assert "running" in statuses
    # replica identity DEFAULT: an update names its row by the primary key only
    assert all(c["identity"] == [{"name": "id", "type": "uuid", "value": job_id}]
               for c in job_changes if c["action"] == "U")


def test_log_lines_do_not_rewrite_the_jobs_row(slot):
    """A log webhook changes the prediction (its logs tail), not what the job shows: the jobs
    row is not rewritten, so Realtime subscribers to jobs hear nothing (010: job_activity)."""
    job_with_logs(slot, log_lines=0)
    changes(slot, realtime_tables(slot))  # the job's creation and start
    job_id = slot.execute("SELECT id FROM jobs").fetchone()["id"]
    states = bodies(LIFECYCLE, f"p-{str(job_id)[-12:]}")
    for n in range(20):
        body = dict(states[1], logs=states[1]["logs"] + f"\nmore {n}")
        webhook(slot, str(job_id), body, key=f"more-{n}")
    streamed = changes(slot, realtime_tables(slot))
    assert [c["table"] for c in streamed].count("predictions") == 20
    assert [c["table"] for c in streamed].count("jobs") == 0
