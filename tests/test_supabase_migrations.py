"""supabase/migrations mirrors sql/ (scripts/supabase_migrations.py), and applying the mirror
the way `supabase db push` does gives the same database as the service's migrate command."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from scripts import supabase_migrations
from service import db, migrations
from tests.conftest import _admin, with_database
from tests.supabase import create_project

# What a schema is made of, to compare two databases: columns, constraints, indexes,
# functions with their bodies, triggers, policies, privileges, publication membership.
FINGERPRINT = """
SELECT 'column' AS kind, table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable AS item
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL SELECT 'constraint', conrelid::regclass || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL SELECT 'function', p.oid::regprocedure || ' ' || md5(pg_get_functiondef(p.oid))
FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND p.prokind IN ('f', 'p')
UNION ALL SELECT 'trigger', tgrelid::regclass || ' ' || pg_get_triggerdef(oid)
FROM pg_trigger WHERE NOT tgisinternal
UNION ALL SELECT 'policy', schemaname || '.' || tablename || ' ' || policyname || ' ' || cmd || ' '
    || array_to_string(roles, ',') || ' ' || coalesce(qual, '') || ' ' || coalesce(with_check, '')
FROM pg_policies
UNION ALL SELECT 'privilege', c.relname || ' ' || coalesce(c.relacl::text, '') || ' ' || c.relrowsecurity
FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace
UNION ALL SELECT 'published', tablename FROM pg_publication_tables WHERE pubname = 'supabase_realtime'
ORDER BY 1, 2
"""


def test_the_mirror_agrees_with_sql():
    stale = supabase_migrations.differences()
    assert stale == [], "run: python scripts/supabase_migrations.py"


def test_the_mirror_names_sort_in_migration_order_and_keep_the_sql_unchanged():
    names = [supabase_migrations.mirror_name(m) for m in migrations.discover()]
    assert names == sorted(names) and len(set(n[:14] for n in names)) == len(names)
    for m in migrations.discover():
        assert m.sql.rstrip() in supabase_migrations.mirror_text(m)


def test_a_stale_or_extra_mirror_file_is_reported(tmp_path: Path):
    supabase_migrations.write(tmp_path)
    first = sorted(tmp_path.iterdir())[0]
    first.write_text(first.read_text() + "-- edited\n")
    (tmp_path / "20990101000000_mine.sql").write_text("SELECT 1;\n")
    assert supabase_migrations.differences(tmp_path) == [
        f"differs from sql/: {first.name}", "not from sql/: 20990101000000_mine.sql"]
    assert supabase_migrations.write(tmp_path) == ["removed 20990101000000_mine.sql", f"wrote {first.name}"]
    assert supabase_migrations.differences(tmp_path) == []


def push(conn: psycopg.Connection) -> None:
    """What `supabase db push` does: each file not yet applied, in name order, as one transaction."""
    for path in sorted(supabase_migrations.MIRROR_DIR.glob("*.sql")):
        with conn.transaction():
            conn.execute(path.read_text())


@pytest.fixture
def pushed(server_url: str) -> Iterator[str]:
    name = f"rjs_supabase_push_{os.getpid()}"
    with _admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    url = with_database(server_url, name)
    create_project(server_url, url, name, apply=push)
    yield url
    with _admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_db_push_of_the_mirror_builds_what_migrate_builds_and_migrate_then_has_nothing_to_do(
        pushed, supabase_url):
    with db.connect(pushed, autocommit=True) as conn:
        assert migrations.migrate(conn) == []
        by_push = conn.execute(FINGERPRINT).fetchall()
    with db.connect(supabase_url, autocommit=True) as conn:
        by_migrate = conn.execute(FINGERPRINT).fetchall()
    assert len(by_push) > 200
    assert by_push == by_migrate
