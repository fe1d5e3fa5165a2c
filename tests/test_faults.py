"""The fault run (scripts/faults/run.py), CI-sized: the real stack (gunicorn, worker processes,
the Replicate simulator) on a PostgreSQL of its own, under steady webhook load, while a gunicorn
worker and a worker process holding a task are killed with SIGKILL and PostgreSQL crashes and
restarts. Nothing acknowledged may be lost, every job must end, nothing may be processed twice,
and the projections must equal a replay. About a minute."""

from __future__ import annotations

import threading
import time
from collections import Counter

import psycopg

from scripts.faults.postgres import private_postgres
from scripts.faults.run import report, run_suite
from scripts.faults.stack import StackOptions
from service import create_app, db, migrations, queue
from service.cli import handlers, worker_context
from service.worker import Worker
from tests.waiting import wait_for


def test_kills_and_a_database_crash_under_load_lose_nothing(tmp_path):
    result = run_suite(tmp_path, duration=28, rate=1.0, fault_every=8, drain=60,
                       options=StackOptions(speed=10, workers=2), say=lambda _: None)
    c = result.counts
    summary = report(result, 1.0)
    kinds = Counter(f.kind for f in result.faults)
    assert kinds == {"kill -9 gunicorn worker": 1, "kill -9 worker mid-task": 1,
                     "PostgreSQL crash and restart": 1}, summary
    web, worker, database = result.faults
    assert web.detail["respawned"], summary
    assert worker.detail["task_id"] is not None, summary  # it was holding a task when killed
    # the killed worker's task was claimed again and finished
    status, attempts = result.killed_tasks[worker.detail["task_id"]]
    assert status == "done" and attempts >= 2, summary
    assert all(result.recovered), summary  # webhooks answered 2xx after each fault
    assert result.settled, summary

    assert c.acknowledged > 200 and c.jobs_created >= 15, summary  # the load was real
    assert (c.lost, c.recorded_twice) == (0, 0), summary
    assert c.recorded == c.acknowledged + c.recorded_unacknowledged, summary
    assert c.not_terminal == 0 and c.jobs_missing == 0 and sum(c.jobs.values()) >= c.jobs_created, summary
    assert c.prediction_mismatches == 0, summary
    assert c.outputs_processed > 0 and c.processed_twice == 0, summary
    assert c.files == c.outputs_processed and c.file_problems == 0 and c.tmp_files == 0, summary
    assert c.replay_differences == 0, summary
    assert result.ok, summary


def test_requests_after_a_database_restart_get_fresh_connections(tmp_path):
    """Every idle pooled connection dies with the server; none may fail a request once the
    server is back (each used to fail the request it was next handed to)."""
    with private_postgres() as pg:
        url = pg.url.replace("/postgres?", "/restart?", 1)
        with psycopg.connect(pg.url, autocommit=True) as admin:
            admin.execute("CREATE DATABASE restart")
        with db.connect(url, autocommit=True) as conn:
            migrations.migrate(conn)
        app = create_app({"TESTING": True, "DATABASE_URL": url, "DB_POOL_MIN": 4, "DB_POOL_MAX": 4,
                          "STORAGE_DIR": str(tmp_path)})
        pool = app.extensions["db_pool"]
        try:
            pool.wait(10)
            client = app.test_client()
            assert client.get("/healthz").status_code == 200
            pg.restart("immediate")
            started = time.monotonic()
            answers = [client.get("/healthz").status_code for _ in range(8)]
            assert answers == [200] * 8
            assert time.monotonic() - started < 4  # the pool's pause before a new connection: ~1 s
            assert pool.get_stats()["connections_lost"] >= 4  # the check found them dead
        finally:
            pool.close()


def test_a_worker_listens_again_after_a_database_restart(tmp_path):
    """A task enqueued after a restart wakes an idle worker at once (NOTIFY), not a poll later."""
    with private_postgres() as pg:
        url = pg.url.replace("/postgres?", "/relisten?", 1)
        with psycopg.connect(pg.url, autocommit=True) as admin:
            admin.execute("CREATE DATABASE relisten")
        with db.connect(url, autocommit=True) as conn:
            migrations.migrate(conn)
        app = create_app({"TESTING": True, "DATABASE_URL": url, "STORAGE_DIR": str(tmp_path),
                          "REPLICATE_API_TOKEN": "unused"})
        worker = Worker(worker_context(app), handlers(), poll_seconds=60)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
        try:
            thread.start()
            wait_for("the worker to LISTEN", lambda: listening(url), 10)
            pg.restart("immediate")
            wait_for("the worker to LISTEN again", lambda: listening(url), 10)  # long before the 60 s poll
            with db.connect(url, autocommit=True) as conn:
                # a job nobody knows: the worker finishes the task at once
                queue.enqueue(conn, "process_output", "process:p1:0", None, {
                    "prediction_id": "p1", "index": 0, "source_url": "https://replicate.delivery/p1.png"})
                wait_for("the task to be done", lambda: conn.execute(
                    "SELECT status FROM tasks WHERE task_key = %s", ("process:p1:0",)
                ).fetchone()["status"] == "done", 5)
        finally:
            stop.set()
            with db.connect(url, autocommit=True) as conn:
                conn.execute("NOTIFY tasks")  # wake it to see the stop
            thread.join(10)
            app.extensions["db_pool"].close()


def listening(url: str) -> bool:
    with db.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE query = 'LISTEN tasks'"
                            ).fetchone()["n"] > 0

