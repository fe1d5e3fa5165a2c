"""How the service connects (service/db.py), as Supabase needs it: no server-side prepared
statements (a transaction-mode pooler), a statement timeout, and a warning when a pooler
dropped it; TLS checked against a private PostgreSQL 15 serving a certificate of our own."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest

from service import create_app, db
from tests import pg15
from tests.conftest import _admin, with_database

BODY = {"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse"}}


def test_the_pool_never_prepares_statements_on_the_server(db_url):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "DB_POOL_MIN": 1, "DB_POOL_MAX": 1})
    client = app.test_client()
    try:
        for _ in range(10):  # psycopg would prepare a query after 5 runs by default
            assert client.post("/api/jobs", json=BODY).status_code == 201
            assert client.get("/api/jobs").status_code == 200
        with app.extensions["db_pool"].connection() as conn:
            assert conn.execute("SELECT count(*) AS n FROM pg_prepared_statements").fetchone() == {"n": 0}
    finally:
        app.extensions["db_pool"].close()


def test_the_statement_timeout_applies_to_pooled_connections(db_url, caplog):
    pool = db.open_pool(db_url, 1, 1, statement_timeout_ms=300)
    try:
        with caplog.at_level(logging.WARNING, logger="service.db"), pool.connection() as conn:
            with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
                conn.execute("SELECT pg_sleep(2)")
        assert [r for r in caplog.records if getattr(r, "action", "") == "db_statement_timeout"] == []
    finally:
        pool.close()


def test_a_timeout_the_server_did_not_take_is_warned_about_once(server_url, db_url, caplog):
    """As through a pooler that drops startup options: the server's own setting wins."""
    name = urlsplit(db_url).path.lstrip("/")
    with _admin(server_url) as admin:
        admin.execute(f'ALTER DATABASE "{name}" SET statement_timeout = 5000')
    pool = db.open_pool(with_database(server_url, name), 2, 2, statement_timeout_ms=0)
    try:
        with caplog.at_level(logging.WARNING, logger="service.db"):
            pool.wait(timeout=10)
            with pool.connection() as conn:
                conn.execute("SELECT 1")
        warnings = [r for r in caplog.records if getattr(r, "action", "") == "db_statement_timeout"]
        assert len(warnings) == 1
        assert "statement timeout is 5000 ms, not DB_STATEMENT_TIMEOUT_MS=0" in warnings[0].getMessage()
    finally:
        pool.close()


@pytest.fixture(scope="module")
def tls_server() -> Iterator[pg15.Cluster]:
    reason = pg15.missing()
    if reason:
        pytest.skip(f"TLS test skipped: {reason}")
    with pg15.cluster(tls=True) as private:
        yield private


def test_tls_verified_against_the_ca_named_in_the_url(tls_server):
    url = tls_server.url(sslmode="verify-full", sslrootcert=str(tls_server.ca))
    pool = db.open_pool(url, 1, 1, statement_timeout_ms=30_000)
    try:
        with pool.connection() as conn:
            row = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row["ssl"] is True and row["version"].startswith("TLSv1.")
    finally:
        pool.close()


def test_tls_refuses_a_server_the_ca_did_not_sign(tls_server, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    pg15.write_certificates(other, "another CA")  # which never signed the server's certificate
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        db.connect(tls_server.url(sslmode="verify-full", sslrootcert=str(other / "ca.crt")))
