"""Tests run against a real PostgreSQL: the embedded one (pgserver) by default, or the
server named by DATABASE_URL. The session migrates a template database once; each test
gets a fresh clone of it."""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from service import commands, create_app, db, migrations

# Real Replicate bodies and the Standard Webhooks vectors, kept byte for byte in the repository
# (tests/fixtures/replicate/README.md says where each came from).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "replicate"
PAYLOADS = FIXTURES / "payloads"
_counter = itertools.count()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A URL to the server's maintenance database (postgres)."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield with_database(configured, "postgres")
        return
    pgserver = db.import_pgserver()

    # Not under pytest's basetemp: pytest deletes all but the newest three of those, so a
    # second test session starting meanwhile would delete this one's database under it.
    pgdata = Path(tempfile.mkdtemp(prefix="rjs-test-pg-"))
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


def _admin(server_url: str) -> psycopg.Connection:
    return psycopg.connect(server_url, autocommit=True)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    name = f"rjs_template_{os.getpid()}"
    with _admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    with db.connect(with_database(server_url, name), autocommit=True) as conn:
        migrations.migrate(conn)
    yield name
    with _admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _clone(server_url: str, template: str, prefix: str) -> Iterator[str]:
    """A fresh copy of a template database for one test, dropped after it."""
    name = f"{prefix}_{os.getpid()}_{next(_counter)}"
    with _admin(server_url) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    yield with_database(server_url, name)
    with _admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    yield from _clone(server_url, template_db, "rjs_test")


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's database: each append commits."""
    with db.connect(db_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def app(db_url: str):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url})
    yield app
    app.extensions["db_pool"].close()


@pytest.fixture
def client(app):
    return app.test_client()


def payload(name: str) -> dict:
    """A real prediction body Replicate sent (tests/fixtures/replicate/payloads)."""
    return json.loads((PAYLOADS / f"{name}.json").read_text())


def new_job_id() -> str:
    """A job id as the service makes one (UUIDv7: time-ordered, random tail)."""
    return commands.new_job_id()


@pytest.fixture(scope="session")
def supabase_template(server_url: str) -> Iterator[str]:
    """A database laid out like a Supabase project (tests/supabase.py), migrated by its
    non-superuser owner."""
    from tests import supabase

    name = f"rjs_supabase_template_{os.getpid()}"
    with _admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    supabase.create_project(server_url, with_database(server_url, name), name)
    yield name
    with _admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def supabase_url(server_url: str, supabase_template: str) -> Iterator[str]:
    """A fresh clone of the Supabase-like project for one test."""
    yield from _clone(server_url, supabase_template, "rjs_supabase")
