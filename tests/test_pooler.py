"""The service through a transaction-mode pooler: PgBouncer (pool_mode = transaction) stands
in for Supavisor's port 6543, in front of the test's database, with fewer server
connections than the service's pool, so consecutive transactions of one client land on
different server connections. PgBouncer comes from Debian, unpacked into .venv by
scripts/setup_pg_tools.sh; the test skips, saying so, where it is missing."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from service import create_app, db, migrations
from service.config import ROOT
from tests import pg15
from tests.pg15 import as_server_user, free_port

BODY = {"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse"}, "count": 2}


def pgbouncer_binary() -> str | None:
    unpacked = ROOT / ".venv" / "pgbouncer" / "usr" / "sbin" / "pgbouncer"
    return str(unpacked) if unpacked.exists() else shutil.which("pgbouncer")


def ini(target: dict, port: int, home: Path) -> str:
    host, server_port = target.get("host") or "127.0.0.1", target.get("port") or 5432
    user = target.get("user") or "postgres"
    return f"""[databases]
rjs = host={host} port={server_port} dbname={target['dbname']} user={user}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {home}/users.txt
pool_mode = transaction
default_pool_size = 2
max_client_conn = 50
ignore_startup_parameters = options,extra_float_digits
logfile = {home}/pgbouncer.log
pidfile = {home}/pgbouncer.pid
"""


@pytest.fixture(scope="module")
def backend() -> Iterator[pg15.Cluster]:
    """The server behind the pooler: a private PostgreSQL 15 over TCP (PgBouncer runs as the
    postgres system user, which may not reach the embedded server's socket)."""
    reason = pg15.missing() or (None if pgbouncer_binary() else
                                "pgbouncer is missing (scripts/setup_pg_tools.sh unpacks it as root)")
    if reason:
        pytest.skip(f"pooler test skipped: {reason}")
    with pg15.cluster() as private:
        yield private


@pytest.fixture
def db_url(backend: pg15.Cluster) -> Iterator[str]:
    """A fresh, migrated database on the backend for one test."""
    name = f"rjs_pooled_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(backend.url(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    with db.connect(backend.url(name), autocommit=True) as conn:
        migrations.migrate(conn)
    yield backend.url(name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """A direct connection to the test's database, beside the pooler."""
    with db.connect(db_url, autocommit=True) as direct:
        yield direct


@pytest.fixture
def pooler(db_url: str) -> Iterator[str]:
    """A URL to the test's database through PgBouncer in transaction mode."""
    binary = pgbouncer_binary()
    home, port = Path(tempfile.mkdtemp(prefix="rjs-pgbouncer-")), free_port()
    (home / "users.txt").write_text('"postgres" ""\n')
    (home / "pgbouncer.ini").write_text(ini(conninfo_to_dict(db_url), port, home))
    if os.geteuid() == 0:  # it runs as the postgres system user (tests/pg15.py)
        for path in (home, home / "users.txt", home / "pgbouncer.ini"):
            shutil.chown(path, "postgres")
    process = subprocess.Popen(as_server_user([binary, str(home / "pgbouncer.ini")]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgresql://postgres@127.0.0.1:{port}/rjs"
    try:
        wait_until_up(url, process, home / "pgbouncer.log")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


def wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline, error = time.monotonic() + 15, None
    while time.monotonic() < deadline and process.poll() is None:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError as exc:
            error = exc
            time.sleep(0.1)
    tail = log.read_text()[-1500:] if log.exists() else ""
    raise RuntimeError(f"pgbouncer is not usable (exit {process.poll()}, last error {error}): {tail}")


def test_the_api_works_through_a_transaction_pooler(pooler, conn, caplog):
    service_logger = logging.getLogger("service")  # create_app stops it propagating to caplog
    service_logger.addHandler(caplog.handler)
    app = create_app({"TESTING": True, "DATABASE_URL": pooler, "DB_POOL_MIN": 4, "DB_POOL_MAX": 4})
    try:
        def one_client(n: int) -> list[int]:
            client = app.test_client()
            key = {"Idempotency-Key": f"pooled-{n}"}
            created = client.post("/api/jobs", json=BODY, headers=key)
            job_id = created.get_json()["id"]
            return [created.status_code, client.post("/api/jobs", json=BODY, headers=key).status_code,
                    client.get(f"/api/jobs/{job_id}").status_code,
                    client.get(f"/api/jobs/{job_id}/events").status_code,
                    client.get("/api/jobs?limit=5").status_code,
                    client.post(f"/api/jobs/{job_id}/cancel").status_code]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one_client, range(40)))
        assert answers == [[201, 200, 200, 200, 200, 202]] * 40
        counts = conn.execute("SELECT (SELECT count(*) FROM jobs) AS jobs, "
                              "(SELECT count(*) FROM jobs WHERE status = 'canceled') AS canceled, "
                              "(SELECT count(*) FROM tasks WHERE kind = 'submit_prediction') AS submits"
                              ).fetchone()
        assert counts == {"jobs": 40, "canceled": 40, "submits": 80}
        with app.extensions["db_pool"].connection() as pooled:
            backends = pooled.execute("SELECT count(*) AS n FROM pg_stat_activity "
                                      "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                                      "AND application_name = ''").fetchone()["n"]
        assert backends <= 2 + 1  # PgBouncer's two, and the test's own connection
    finally:
        app.extensions["db_pool"].close()
        service_logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if getattr(r, "action", "") == "db_statement_timeout"]
    assert warnings and "not DB_STATEMENT_TIMEOUT_MS=30000" in warnings[0]


def test_a_named_prepared_statement_would_break_there(pooler):
    """Why prepare_threshold=None: the same query prepared by psycopg fails through it."""
    with psycopg.connect(pooler, prepare_threshold=0, autocommit=True) as raw, \
            psycopg.connect(pooler, autocommit=True) as other:
        raw.execute("SELECT 1 WHERE %s::text IS NOT NULL", (str(uuid.uuid4()),))
        with other.transaction():  # holds one of the two server connections
            other.execute("SELECT 1")
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                for _ in range(20):
                    with raw.transaction():
                        raw.execute("SELECT pg_sleep(0)")
                        raw.execute("SELECT 1 WHERE %s::text IS NOT NULL", (str(uuid.uuid4()),))
