from __future__ import annotations

import psycopg
import pytest

from service import db, migrations
from service.errors import MigrationError
from tests.conftest import with_database


@pytest.fixture
def empty_db(server_url):
    name = "rjs_empty_migrations"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    yield with_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrations_apply_to_an_empty_database_and_twice_is_a_no_op(empty_db):
    with db.connect(empty_db, autocommit=True) as conn:
        applied = migrations.migrate(conn)
        assert applied == [m.version for m in migrations.discover()]
        assert applied[0] == "001_events"
        assert migrations.migrate(conn) == []
        recorded = conn.execute("SELECT version, checksum FROM schema_migrations ORDER BY 1").fetchall()
        assert [r["version"] for r in recorded] == applied
        assert all(len(r["checksum"]) == 64 for r in recorded)


def test_an_edited_applied_migration_is_refused(empty_db, tmp_path):
    for m in migrations.discover():
        (tmp_path / m.path.name).write_text(m.sql)
    with db.connect(empty_db, autocommit=True) as conn:
        migrations.migrate(conn, tmp_path)
        first = sorted(tmp_path.glob("*.sql"))[0]
        first.write_text(first.read_text() + "\n-- an edit\n")
        with pytest.raises(MigrationError, match=f"{first.name} was edited after it was applied"):
            migrations.migrate(conn, tmp_path)


def test_a_new_migration_is_applied_after_the_others(empty_db, tmp_path):
    for m in migrations.discover():
        (tmp_path / m.path.name).write_text(m.sql)
    with db.connect(empty_db, autocommit=True) as conn:
        migrations.migrate(conn, tmp_path)
        (tmp_path / "999_extra.sql").write_text("CREATE TABLE extra (id int);")
        assert migrations.migrate(conn, tmp_path) == ["999_extra"]
        assert conn.execute("SELECT count(*) AS n FROM extra").fetchone()["n"] == 0


def test_a_failing_migration_leaves_nothing_half_applied(empty_db, tmp_path):
    (tmp_path / "001_good.sql").write_text("CREATE TABLE good (id int);")
    (tmp_path / "002_bad.sql").write_text("CREATE TABLE half (id int); SELECT no_such_function();")
    with db.connect(empty_db, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            migrations.migrate(conn, tmp_path)
        tables = {r["relname"] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relname IN ('good', 'half')")}
        assert tables == {"good"}
        versions = [r["version"] for r in conn.execute("SELECT version FROM schema_migrations")]
        assert versions == ["001_good"]


def test_two_files_with_one_number_are_refused(tmp_path):
    (tmp_path / "001_a.sql").write_text("")
    (tmp_path / "001_b.sql").write_text("")
    with pytest.raises(MigrationError, match="share the number 001"):
        migrations.discover(tmp_path)
