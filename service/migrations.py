"""Bring a database up to sql/: versioned migrations, then the repeatable files.

sql/migrations/NNN_name.sql hold what holds data (tables, columns, indexes, data changes):
each is applied once, in order, and recorded with its checksum in schema_migrations; an
applied file is never edited. The files named in REPEATABLES (sql/store.sql, sql/fold.sql,
...) hold what holds no data (functions, views, triggers, policies, grants): each object is
defined in exactly one of them, and when any of them differs from what schema_repeatables
records, all of them are applied again, in REPEATABLES' order. The whole run is one
transaction, under an advisory lock.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from service.config import ROOT
from service.errors import MigrationError

logger = logging.getLogger(__name__)

SQL_DIR = ROOT / "sql"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")

# The repeatable files, in the order they are applied: each may use what the ones before it
# define (a view or a SQL function's body names the objects it uses when it is created).
REPEATABLES = (
    "store.sql",  # events' immutability and access, append_event, the webhook appends
    "fold.sql",  # how events become the projections
    "rebuild.sql",  # the same fold, set-based, for replay
    "history_views.sql",  # the views for people
    "queue.sql",  # the task queue, and the work the live fold enqueues
    "dashboard.sql",  # NOTIFY on job changes
    "supabase_security.sql",  # privileges, policies, Realtime: last, it grants on the rest
)
# In sql/ but neither a migration nor repeatable: named queries, looked up by service/db.py.
NOT_APPLIED = frozenset({"queries.sql"})

# The last release whose sql/NNN files restated functions; see _refound.
LEGACY_RELEASE = "abbdd43"
LEGACY_CHECKSUMS = "LEGACY_CHECKSUMS"

# Taken for the whole run, so two processes starting at once cannot both apply a file.
_LOCK_KEY = 7_215_001

_CREATE_TABLES = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS schema_repeatables (
    name       text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE schema_repeatables ENABLE ROW LEVEL SECURITY"""


@dataclass(frozen=True)
class SqlFile:
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Migration(SqlFile):
    version: str


@dataclass(frozen=True)
class Repeatable(SqlFile):
    name: str


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    """The versioned migrations in sql_dir/migrations, in order."""
    folder = sql_dir / "migrations"
    found = [Migration(p, p.stem) for p in sorted(folder.glob("*.sql")) if _NAME.match(p.name)]
    numbers = [m.version[:3] for m in found]
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicates:
        raise MigrationError(f"two migrations share the number {', '.join(duplicates)} in {folder}")
    return found


def repeatables(sql_dir: Path = SQL_DIR) -> list[Repeatable]:
    """The repeatable files in the order they are applied. Refuses a .sql file in sql_dir that
    is in no list: it would never be applied."""
    stray = sorted(p.name for p in sql_dir.glob("*.sql")
                   if p.name not in REPEATABLES and p.name not in NOT_APPLIED)
    if stray:
        raise MigrationError(
            f"{', '.join(stray)} in {sql_dir} would never be applied: name it in REPEATABLES "
            "(service/migrations.py), or make it a migration in sql/migrations/")
    missing = [name for name in REPEATABLES if not (sql_dir / name).is_file()]
    if missing:
        raise MigrationError(f"repeatable file missing from {sql_dir}: {', '.join(missing)}")
    return [Repeatable(sql_dir / name, name) for name in REPEATABLES]


def migrate(conn: psycopg.Connection, sql_dir: Path = SQL_DIR, *,
            event_partitions: str | None = None) -> list[str]:
    """Apply every migration not yet recorded, then the repeatable files if any changed; all
    in one transaction. Returns what was applied now: versions, then repeatable file names.

    event_partitions (the EVENT_PARTITIONS setting: auto, partman or builtin) says who keeps
    events' partitions, and hands them over, in the same transaction, when that changes
    (manage_event_partitions in sql/store.sql); checked at every run, so a database that
    gains pg_partman is handed to it at the next one. None leaves them with their keeper.

    Refuses to run when an applied migration has changed since: migrations are never edited
    once applied; write a new one instead.
    """
    migrations, files = discover(sql_dir), repeatables(sql_dir)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(_CREATE_TABLES)
        pending = _pending(conn, migrations, sql_dir)
        for migration in pending:
            conn.execute(migration.sql)
            conn.execute("INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                         (migration.version, migration.checksum))
            logger.info("applied migration %s", migration.version,
                        extra={"action": "migrate", "version": migration.version})
        reapplied = _apply_repeatables(conn, files)
        if event_partitions is not None:
            _keep_event_partitions(conn, event_partitions)
    return [m.version for m in pending] + reapplied


def _keep_event_partitions(conn: psycopg.Connection, mode: str) -> None:
    """manage_event_partitions(mode); its warnings (auto keeping the built-in upkeep because
    the hand-over to pg_partman failed, and why) are logged here, its errors are one line."""
    before = event_partitions_keeper(conn)
    warnings: list[str] = []

    def note(diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized == "WARNING" and diag.message_primary:
            warnings.append(diag.message_primary)

    conn.add_notice_handler(note)
    try:
        keeper = conn.execute("SELECT manage_event_partitions(%s) AS keeper", (mode,)).fetchone()["keeper"]
    except (psycopg.errors.FeatureNotSupported, psycopg.errors.InvalidParameterValue) as exc:
        raise MigrationError(f"{exc.diag.message_primary}"
                             + (f"; {exc.diag.message_hint}" if exc.diag.message_hint else "")) from exc
    except psycopg.errors.InsufficientPrivilege as exc:
        raise MigrationError(f"EVENT_PARTITIONS={mode}: this role may not install or use pg_partman "
                             f"here ({exc.diag.message_primary}); have an administrator create the "
                             "extension, or set EVENT_PARTITIONS=auto or builtin") from exc
    except psycopg.errors.DatabaseError as exc:  # pg_partman's own errors come as raise_exception
        raise MigrationError(f"EVENT_PARTITIONS={mode}: events' partitions could not be handed to "
                             f"pg_partman: {(exc.diag.message_primary or str(exc)).splitlines()[0]}") from exc
    finally:
        conn.remove_notice_handler(note)
    for warning in warnings:
        logger.warning("%s", warning, extra={"action": "event_partitions", "keeper": keeper})
    if keeper != before:
        logger.info("events' partitions handed from %s to %s", before, keeper,
                    extra={"action": "event_partitions", "keeper": keeper, "was": before})


def event_partitions_keeper(conn: psycopg.Connection) -> str:
    """Who keeps events' partitions: 'pg_partman' or 'builtin' (sql/store.sql)."""
    return conn.execute("SELECT event_partitions_keeper() AS keeper").fetchone()["keeper"]


def _apply_repeatables(conn: psycopg.Connection, files: list[Repeatable]) -> list[str]:
    """All the files again when any differs from its record; none when all agree."""
    rows = conn.execute("SELECT name, checksum FROM schema_repeatables").fetchall()
    recorded = {row["name"]: row["checksum"] for row in rows}
    if all(recorded.get(f.name) == f.checksum for f in files):
        return []
    for file in files:
        conn.execute(file.sql)
        conn.execute(
            "INSERT INTO schema_repeatables (name, checksum) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, applied_at = now()",
            (file.name, file.checksum))
        logger.info("applied %s", file.name, extra={"action": "migrate", "file": file.name})
    return [f.name for f in files]


def _pending(conn: psycopg.Connection, migrations: list[Migration], sql_dir: Path) -> list[Migration]:
    rows = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    applied = {row["version"]: row["checksum"] for row in rows}
    _refound(conn, migrations, applied, legacy_checksums(sql_dir))
    for migration in migrations:
        recorded = applied.get(migration.version)
        if recorded is not None and recorded != migration.checksum:
            raise MigrationError(
                f"migration {migration.path.name} was edited after it was applied "
                f"(recorded checksum {recorded[:12]}…, file now {migration.checksum[:12]}…); "
                "restore the file and put the change in a new migration")
    return [m for m in migrations if m.version not in applied]


def legacy_checksums(sql_dir: Path = SQL_DIR) -> dict[str, str]:
    """version -> checksum of the sql/NNN file as release abbdd43 had it (functions and all)."""
    path = sql_dir / "migrations" / LEGACY_CHECKSUMS
    if not path.is_file():
        return {}
    lines = [line.split() for line in path.read_text().splitlines()]
    return {parts[0]: parts[1] for parts in lines if len(parts) == 2 and not parts[0].startswith("#")}


def _refound(conn: psycopg.Connection, migrations: list[Migration], applied: dict[str, str],
             legacy: dict[str, str]) -> None:
    """A database migrated by release abbdd43 or before recorded the old files' checksums.
    Its data is what the new migrations give, and its functions are replaced by the
    repeatable files (applied next: it has no record of them), so the new checksums are
    recorded in place of the old. Only a database that has every old migration: the new
    files cannot take one from the middle of the old history."""
    current = {m.version: m.checksum for m in migrations}
    old = {v for v, c in applied.items() if legacy.get(v) == c and current.get(v) != c}
    if not old:
        return
    missing = sorted(set(legacy) - set(applied))
    if missing:
        raise MigrationError(
            f"this database was migrated by an older release (it lacks {', '.join(missing)}); "
            f"first run `flask --app service migrate` from the release at commit {LEGACY_RELEASE} "
            "(the last with the old sql/ layout), then this one")
    for version in sorted(old):
        conn.execute("UPDATE schema_migrations SET checksum = %s WHERE version = %s",
                     (current[version], version))
        applied[version] = current[version]
    logger.info("re-founded: functions now live in sql/*.sql (%d migrations re-recorded)", len(old),
                extra={"action": "migrate_refound", "versions": sorted(old)})
