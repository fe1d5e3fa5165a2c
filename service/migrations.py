"""Apply sql/NNN_name.sql in order, once each, recorded with a checksum."""

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

# Taken for the whole run, so two processes starting at once cannot both apply a file.
_LOCK_KEY = 7_215_001

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class Migration:
    version: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    found = [Migration(p.stem, p) for p in sorted(sql_dir.glob("*.sql")) if _NAME.match(p.name)]
    numbers = [m.version[:3] for m in found]
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicates:
        raise MigrationError(f"two migrations share the number {', '.join(duplicates)} in {sql_dir}")
    return found


def migrate(conn: psycopg.Connection, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply every migration not yet recorded; return the versions applied now.

    `conn` must be in autocommit mode: each file runs in a transaction of its own.
    Refuses to run when an applied file has changed since: migrations are never edited
    once applied; write a new one instead.
    """
    migrations = discover(sql_dir)
    conn.execute(_CREATE_TABLE)
    conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        pending = _pending(conn, migrations)
        for migration in pending:
            with conn.transaction():
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                    (migration.version, migration.checksum),
                )
            logger.info("applied migration %s", migration.version,
                        extra={"action": "migrate", "version": migration.version})
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return [m.version for m in pending]


def _pending(conn: psycopg.Connection, migrations: list[Migration]) -> list[Migration]:
    rows = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    applied = {row["version"]: row["checksum"] for row in rows}
    for migration in migrations:
        recorded = applied.get(migration.version)
        if recorded is not None and recorded != migration.checksum:
            raise MigrationError(
                f"migration {migration.path.name} was edited after it was applied "
                f"(recorded checksum {recorded[:12]}…, file now {migration.checksum[:12]}…); "
                "restore the file and put the change in a new migration")
    return [m for m in migrations if m.version not in applied]
