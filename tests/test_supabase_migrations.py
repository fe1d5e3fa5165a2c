"""supabase/migrations mirrors sql/ (scripts/supabase_migrations.py), and applying the mirror
the way `supabase db push` does gives the same database as the service's migrate command:
on a new project, and on one that pushed the mirror of the old layout (release abbdd43)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from scripts import supabase_migrations
from service import db, migrations
from tests.catalog import catalog
from tests.conftest import _admin, with_database
from tests.supabase import OWNER, create_project
from tests.test_migrations import apply_legacy


def test_the_mirror_agrees_with_sql():
    stale = supabase_migrations.differences()
    assert stale == [], "run: python scripts/supabase_migrations.py"


def test_the_mirror_names_sort_in_migration_order_and_keep_the_sql_unchanged():
    names = [supabase_migrations.mirror_name(m) for m in migrations.discover()]
    assert names == sorted(names) and len(set(n[:14] for n in names)) == len(names)
    for m in migrations.discover():
        assert m.sql.rstrip() in supabase_migrations.mirror_text(m)
    snapshot = supabase_migrations.snapshots()[-1]
    assert snapshot.name > names[-1] and snapshot.name[:12] == names[-1][:12]
    text = snapshot.read_text()
    places = [text.index(f.sql.rstrip()) for f in migrations.repeatables()]
    assert places == sorted(places)


@pytest.fixture
def sql_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(migrations.SQL_DIR, tmp_path / "sql"))


def test_a_stale_or_extra_mirror_file_is_reported(tmp_path: Path, sql_copy: Path):
    mirror = tmp_path / "mirror"
    supabase_migrations.write(mirror, sql_copy)
    first = sorted(mirror.iterdir())[0]
    first.write_text(first.read_text() + "-- edited\n")
    (mirror / "20990101000000_mine.sql").write_text("SELECT 1;\n")
    assert supabase_migrations.differences(mirror, sql_copy) == [
        f"differs from sql/: {first.name}", "not from sql/: 20990101000000_mine.sql"]
    assert supabase_migrations.write(mirror, sql_copy) == [
        "removed 20990101000000_mine.sql", f"wrote {first.name}"]
    assert supabase_migrations.differences(mirror, sql_copy) == []


def test_a_change_of_a_repeatable_file_is_a_new_snapshot_and_the_earlier_stays(tmp_path: Path,
                                                                               sql_copy: Path):
    mirror = tmp_path / "mirror"
    supabase_migrations.write(mirror, sql_copy)
    first = supabase_migrations.snapshots(mirror)
    last = supabase_migrations.mirror_name(migrations.discover()[-1])[:14]  # the snapshot follows it
    assert [p.name for p in first] == [f"{int(last) + 1}_repeatables.sql"]
    kept = first[0].read_text()
    fold = sql_copy / "fold.sql"
    fold.write_text(fold.read_text() + "\n-- a change\n")
    assert supabase_migrations.differences(mirror, sql_copy) == [f"missing: {int(last) + 2}_repeatables.sql"]
    assert supabase_migrations.write(mirror, sql_copy) == [f"wrote {int(last) + 2}_repeatables.sql"]
    assert first[0].read_text() == kept
    assert "-- a change" in (mirror / f"{int(last) + 2}_repeatables.sql").read_text()
    assert supabase_migrations.differences(mirror, sql_copy) == []
    assert supabase_migrations.write(mirror, sql_copy) == []


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
        by_push = catalog(conn)
    with db.connect(supabase_url, autocommit=True) as conn:
        by_migrate = catalog(conn)
    assert len(by_push) > 400
    assert by_push == by_migrate


def push_after_legacy(conn: psycopg.Connection) -> None:
    """A project that pushed the old layout's mirror (each old file and its record), then
    pushes the new mirror: `supabase db push` applies only the files it has no record of, by
    name, so the versioned files are skipped and the snapshot is applied."""
    apply_legacy(conn)
    legacy = migrations.legacy_checksums()
    pushed = {supabase_migrations.mirror_name(m) for m in migrations.discover() if m.version in legacy}
    for path in sorted(supabase_migrations.MIRROR_DIR.glob("*.sql")):
        if path.name not in pushed:
            with conn.transaction():
                conn.execute(path.read_text())


def test_a_project_that_pushed_the_old_mirror_pushes_the_snapshot_to_the_catalog_migrate_builds(
        server_url, supabase_url):
    name = f"rjs_supabase_push_legacy_{os.getpid()}"
    url = with_database(server_url, name)
    with _admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    try:
        create_project(server_url, url, name, apply=push_after_legacy)
        with db.connect(url, autocommit=True) as conn:
            conn.execute(f"SET ROLE {OWNER}")
            assert migrations.migrate(conn) == []  # re-founds the old records, applies nothing
            by_push = catalog(conn)
        with db.connect(supabase_url, autocommit=True) as conn:
            by_migrate = catalog(conn)
        assert by_push == by_migrate
    finally:
        with _admin(server_url) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
