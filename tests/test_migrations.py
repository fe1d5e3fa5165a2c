"""service/migrations.py: versioned migrations (sql/migrations/), then the repeatable files
(sql/*.sql), in one transaction; and the upgrade of a database migrated by the old layout,
in which every sql/NNN file restated the functions it changed (tests/fixtures/legacy_sql)."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from service import db, migrations, replay
from service.errors import MigrationError
from tests.catalog import catalog, without_comments
from tests.conftest import _admin, new_job_id, with_database
from tests.supabase import OWNER, create_project
from tests.workload import (
    CANCELED,
    FAILED,
    LIFECYCLE,
    bodies,
    cancel_job,
    create_job,
    process_output,
    submit,
    webhook,
)

LEGACY_SQL = Path(__file__).resolve().parent / "fixtures" / "legacy_sql"


def database(server_url: str, name: str) -> Iterator[str]:
    name = f"{name}_{os.getpid()}"
    with _admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    yield with_database(server_url, name)
    with _admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_db(server_url: str) -> Iterator[str]:
    yield from database(server_url, "rjs_empty_migrations")


@pytest.fixture
def sql_copy(tmp_path: Path) -> Path:
    """A copy of sql/ to edit."""
    return Path(shutil.copytree(migrations.SQL_DIR, tmp_path / "sql"))


def apply_legacy(conn: psycopg.Connection, upto: str = "999") -> None:
    """What the old runner did: each sql/NNN file in its own transaction, recorded with its
    checksum."""
    conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
        version text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())""")
    for path in sorted(LEGACY_SQL.glob("*.sql")):
        if path.stem[:3] > upto:
            break
        with conn.transaction():
            conn.execute(path.read_text())
            conn.execute("INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                         (path.stem, hashlib.sha256(path.read_bytes()).hexdigest()))


def load_workload(conn: psycopg.Connection) -> None:
    """Real payloads through append_event and append_webhook: jobs that succeed with processed
    outputs, fail, are canceled, a two-step job, and an orphan webhook."""
    for n, kind in enumerate([LIFECYCLE, LIFECYCLE, FAILED, CANCELED]):
        job = new_job_id()
        create_job(conn, job, **({"then": {"model": "upscaler"}} if n == 1 else {}))
        states = bodies(kind, f"pred{n}")
        submit(conn, job, states[0])
        for k, body in enumerate(states[1:]):
            webhook(conn, job, body, key=f"msg_{n}_{k}")
        if kind is LIFECYCLE:
            process_output(conn, job, f"pred{n}", 0)
        if kind is CANCELED:
            cancel_job(conn, job, "changed my mind")
    webhook(conn, None, bodies(["succeeded_sdxl_polled_list_output"], "orphan")[0], key="msg_orphan")


def rows(conn: psycopg.Connection) -> dict[str, list[dict]]:
    order = {"events": "position", "jobs": "id", "predictions": "id", "outputs": "prediction_id, index",
             "job_activity": "job_id", "tasks": "id"}
    return {t: conn.execute(f"SELECT * FROM {t} ORDER BY {o}").fetchall() for t, o in order.items()}


def migrated_rows(data: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The rows as the migrations since the old layout leave them: 016 counts a two-step
    job's second prediction in predictions_expected; 020 gives each task its owner (its
    job's, for one still to run; else the nil uuid), rank 0 and no hold; 021 adds
    jobs.deadline (none: the old jobs had no cancel_after) and predictions.superseded (none:
    nothing was retried); 024 gives each job_activity row its job.created's position."""
    jobs = [{**j, "predictions_expected": j["predictions_expected"] + (j["next_step"] is not None),
             "deadline": None} for j in data["jobs"]]
    owners = {j["id"]: j["owner_id"] for j in data["jobs"]}
    nil = uuid.UUID(int=0)
    waiting = ("queued", "running")
    tasks = [{**t, "owner_key": (owners.get(t["job_id"]) if t["status"] in waiting else None) or nil,
              "fair_rank": 0, "held_by": None} for t in data["tasks"]]
    predictions = [{**p, "superseded": False} for p in data["predictions"]]
    created = {e["event_key"]: e["position"] for e in data["events"] if e["type"] == "job.created"}
    activity = [{**a, "first_position": created.get(f"created:{a['job_id']}")}
                for a in data["job_activity"]]
    return {**data, "jobs": jobs, "tasks": tasks, "predictions": predictions, "job_activity": activity}


def since_legacy() -> list[str]:
    """The migrations written since the old layout's last release."""
    legacy = migrations.legacy_checksums()
    return [m.version for m in migrations.discover() if m.version not in legacy]


def test_the_legacy_fixtures_are_the_files_the_legacy_checksums_name():
    legacy = migrations.legacy_checksums()
    files = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(LEGACY_SQL.glob("*.sql"))}
    assert files == legacy
    # the old layout's migrations, then those written since
    assert sorted(legacy) == [m.version for m in migrations.discover()][:len(legacy)]


def test_migrations_and_repeatables_apply_to_an_empty_database_and_twice_is_a_no_op(empty_db):
    with db.connect(empty_db, autocommit=True) as conn:
        applied = migrations.migrate(conn)
        versions = [m.version for m in migrations.discover()]
        assert applied == versions + list(migrations.REPEATABLES)
        assert applied[0] == "001_events"
        assert migrations.migrate(conn) == []
        recorded = conn.execute("SELECT version, checksum FROM schema_migrations ORDER BY 1").fetchall()
        assert [r["version"] for r in recorded] == versions
        assert all(len(r["checksum"]) == 64 for r in recorded)
        files = {r["name"]: r["checksum"] for r in conn.execute("SELECT * FROM schema_repeatables")}
        assert files == {f.name: f.checksum for f in migrations.repeatables()}


def test_each_function_view_and_trigger_is_defined_in_one_file_and_no_migration():
    """The point of the layout: a CREATE of a function, view or trigger appears once in sql/,
    in a repeatable file (the is_* functions of CHECK constraints aside: they are part of the
    tables' definitions, in migration 011, and 021's is_known_event_type)."""
    import re
    pattern = re.compile(r"CREATE (?:OR REPLACE )?(FUNCTION|VIEW|TRIGGER) (\w+)", re.IGNORECASE)
    seen: dict[tuple[str, str], list[str]] = {}
    for path in [*(f.path for f in migrations.repeatables()), *(m.path for m in migrations.discover())]:
        for kind, name in pattern.findall(path.read_text()):
            seen.setdefault((kind.upper(), name), []).append(path.name)
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}
    in_migrations = sorted(name for (kind, name), files in seen.items() if files[0][:3].isdigit())
    assert all(name.startswith("is_") for name in in_migrations) and len(in_migrations) == 8


def test_an_edited_applied_migration_is_refused(empty_db, sql_copy):
    with db.connect(empty_db, autocommit=True) as conn:
        migrations.migrate(conn, sql_copy)
        first = sorted((sql_copy / "migrations").glob("*.sql"))[0]
        first.write_text(first.read_text() + "\n-- an edit\n")
        with pytest.raises(MigrationError, match=f"{first.name} was edited after it was applied"):
            migrations.migrate(conn, sql_copy)


def test_a_new_migration_is_applied_after_the_others(empty_db, sql_copy):
    with db.connect(empty_db, autocommit=True) as conn:
        migrations.migrate(conn, sql_copy)
        (sql_copy / "migrations" / "999_extra.sql").write_text("CREATE TABLE extra (id int);")
        assert migrations.migrate(conn, sql_copy) == ["999_extra"]
        assert conn.execute("SELECT count(*) AS n FROM extra").fetchone()["n"] == 0


def test_a_failing_migration_leaves_nothing_applied(empty_db, sql_copy):
    """The whole run is one transaction: the migration before the failing one is undone too."""
    shutil.rmtree(sql_copy / "migrations")
    (sql_copy / "migrations").mkdir()
    (sql_copy / "migrations" / "001_good.sql").write_text("CREATE TABLE good (id int);")
    (sql_copy / "migrations" / "002_bad.sql").write_text(
        "CREATE TABLE half (id int); SELECT no_such_function();")
    with db.connect(empty_db, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            migrations.migrate(conn, sql_copy)
        tables = {r["relname"] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relname IN ('good', 'half', 'schema_migrations')")}
        assert tables == set()


def test_two_files_with_one_number_are_refused(sql_copy):
    (sql_copy / "migrations" / "001_a.sql").write_text("")
    with pytest.raises(MigrationError, match="share the number 001"):
        migrations.discover(sql_copy)


def test_a_sql_file_that_would_never_be_applied_is_refused(sql_copy):
    (sql_copy / "mine.sql").write_text("CREATE FUNCTION mine() RETURNS int RETURN 1;")
    with pytest.raises(MigrationError, match="mine.sql in .* would never be applied"):
        migrations.repeatables(sql_copy)


def test_a_changed_repeatable_file_is_applied_again_without_touching_the_migrations(empty_db, sql_copy):
    with db.connect(empty_db, autocommit=True) as conn:
        migrations.migrate(conn, sql_copy)
        applied_at = "SELECT version, applied_at FROM schema_migrations ORDER BY 1"
        before = conn.execute(applied_at).fetchall()
        files = {r["name"]: r["checksum"] for r in conn.execute("SELECT * FROM schema_repeatables")}
        assert conn.execute("SELECT history_bytes(2048) AS b").fetchone()["b"] == "2.0 KB"
        views = sql_copy / "history_views.sql"
        views.write_text(views.read_text().replace("|| ' KB'", "|| ' KiB'"))
        assert migrations.migrate(conn, sql_copy) == list(migrations.REPEATABLES)
        assert conn.execute("SELECT history_bytes(2048) AS b").fetchone()["b"] == "2.0 KiB"
        now = {r["name"]: r["checksum"] for r in conn.execute("SELECT * FROM schema_repeatables")}
        assert now == {**files, "history_views.sql": migrations.Repeatable(views, "").checksum}
        assert conn.execute(applied_at).fetchall() == before
        assert migrations.migrate(conn, sql_copy) == []


def test_a_failing_repeatable_file_rolls_back_the_whole_run(empty_db, sql_copy):
    with db.connect(empty_db, autocommit=True) as conn:
        migrations.migrate(conn, sql_copy)
        recorded = conn.execute("SELECT name, checksum FROM schema_repeatables ORDER BY 1").fetchall()
        (sql_copy / "migrations" / "999_extra.sql").write_text("CREATE TABLE extra (id int);")
        views = sql_copy / "history_views.sql"
        views.write_text(views.read_text().replace("|| ' KB'", "|| ' KiB'"))
        last = sql_copy / migrations.REPEATABLES[-1]
        last.write_text(last.read_text() + "\nSELECT no_such_function();\n")
        with pytest.raises(psycopg.errors.UndefinedFunction):
            migrations.migrate(conn, sql_copy)
        assert conn.execute("SELECT history_bytes(2048) AS b").fetchone()["b"] == "2.0 KB"
        assert conn.execute("SELECT to_regclass('extra') AS t").fetchone()["t"] is None
        assert conn.execute("SELECT name, checksum FROM schema_repeatables ORDER BY 1").fetchall() == recorded


def test_a_failing_repeatable_file_leaves_an_empty_database_empty(empty_db, sql_copy):
    last = sql_copy / migrations.REPEATABLES[-1]
    last.write_text(last.read_text() + "\nSELECT no_such_function();\n")
    with db.connect(empty_db, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            migrations.migrate(conn, sql_copy)
        assert conn.execute("SELECT count(*) AS n FROM pg_class WHERE relname IN "
                            "('events', 'schema_migrations', 'schema_repeatables')").fetchone()["n"] == 0


def test_a_database_with_only_some_legacy_migrations_is_refused(empty_db):
    with db.connect(empty_db, autocommit=True) as conn:
        apply_legacy(conn, upto="009")
        with pytest.raises(MigrationError, match=r"lacks 010_fold_speed, .*015_webhook_groups.*"
                                                 r"`flask --app service migrate` from the release at "
                                                 r"commit abbdd43"):
            migrations.migrate(conn)
        assert conn.execute("SELECT to_regclass('schema_repeatables') AS t").fetchone()["t"] is None


@pytest.fixture
def fresh_db(server_url: str) -> Iterator[str]:
    yield from database(server_url, "rjs_fresh_migrations")


def test_a_legacy_database_upgrades_to_the_catalog_of_a_fresh_one_and_keeps_its_data(
        empty_db, fresh_db, caplog):
    with db.connect(empty_db, autocommit=True) as a, db.connect(fresh_db, autocommit=True) as b:
        apply_legacy(a)
        load_workload(a)
        data, legacy = rows(a), catalog(a)
        assert len(data["events"]) > 15 and len(data["jobs"]) == 4 and data["tasks"]
        with caplog.at_level("INFO", logger="service.migrations"):
            assert migrations.migrate(a) == since_legacy() + list(migrations.REPEATABLES)
        assert [r.message for r in caplog.records if "re-founded" in r.message] == [
            "re-founded: functions now live in sql/*.sql (15 migrations re-recorded)"]
        assert migrations.migrate(a) == []
        migrations.migrate(b)
        upgraded = catalog(a)
        assert len(upgraded) > 400
        assert upgraded == catalog(b)
        # The layout changed; what the objects do did not: the old files' last definitions,
        # comments and layout of the code aside, are the new files' definitions.
        assert without_comments(legacy) == without_comments(upgraded)
        assert rows(a) == migrated_rows(data)  # every event and projection row, in partitions now
        keys = {r["event_key"]: r["position"] for r in a.execute("SELECT * FROM event_keys")}
        assert keys == {e["event_key"]: e["position"] for e in data["events"]}
        assert {r["p"] for r in a.execute("SELECT tableoid::regclass::text AS p FROM events")} == {
            "store_partitions.events_000000"}
        result = replay.replay(a, check=True)
        assert result.differences == 0 and result.events == len(data["events"])
        recorded = {r["version"]: r["checksum"] for r in a.execute("SELECT * FROM schema_migrations")}
        assert recorded == {m.version: m.checksum for m in migrations.discover()}


def test_a_legacy_supabase_project_upgrades_to_the_catalog_of_a_fresh_one(server_url, supabase_url):
    name = f"rjs_supabase_legacy_{os.getpid()}"
    url = with_database(server_url, name)
    with _admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    try:
        create_project(server_url, url, name, apply=apply_legacy)
        with db.connect(url, autocommit=True) as a:
            load_workload(a)
            data, legacy = rows(a), catalog(a)
            a.execute(f"SET ROLE {OWNER}")
            assert migrations.migrate(a) == since_legacy() + list(migrations.REPEATABLES)
            upgraded = catalog(a)
            assert rows(a) == migrated_rows(data)
        with db.connect(supabase_url, autocommit=True) as b:
            fresh = catalog(b)
        assert ("policy", next(i for k, i in fresh if k == "policy" and "receive_broadcast" in i)) in upgraded
        assert upgraded == fresh
        assert without_comments(legacy) == without_comments(upgraded)
    finally:
        with _admin(server_url) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
