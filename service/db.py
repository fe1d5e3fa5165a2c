"""Database access: which PostgreSQL, the connection pool, named queries, error mapping."""

from __future__ import annotations

import logging
import re
import select
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from service.config import ROOT
from service.errors import ConfigError, InvalidEvent, ServiceError

logger = logging.getLogger(__name__)

QUERIES_FILE = ROOT / "sql" / "queries.sql"
_QUERY_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def load_queries(path: Path = QUERIES_FILE) -> dict[str, str]:
    """Named blocks of sql/queries.sql: a `-- name --` line starts each one."""
    parts = _QUERY_HEADER.split(path.read_text())
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


queries = load_queries()


def redact(url: str) -> str:
    """The URL with any password replaced, fit for logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def import_pgserver() -> ModuleType:
    """The embedded server's package, imported only by the no-DATABASE_URL path (and the
    tests'). pgserver keeps its lock file in the user's runtime directory; where there is
    none (a root shell, a container) platformdirs picks another and warns at the import,
    which every command printed. The lock works the same from there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver
    return pgserver


def embedded_database_url(data_dir: str) -> str:
    """Start (or join) the embedded PostgreSQL keeping its data in DATA_DIR/postgres."""
    pgserver = import_pgserver()
    pgdata = Path(data_dir) / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:  # pgserver raises plain exceptions with its own message
        raise ConfigError(f"could not start the embedded PostgreSQL in {pgdata}: {exc}") from exc
    return server.get_uri()


def resolve_database_url(database_url: str | None, data_dir: str) -> str:
    if database_url:
        logger.info("using PostgreSQL from DATABASE_URL %s", redact(database_url),
                    extra={"action": "db_select"})
        return database_url
    url = embedded_database_url(data_dir)
    logger.info("using the embedded PostgreSQL in %s/postgres", data_dir,
                extra={"action": "db_select"})
    return url


def connect(url: str, **kwargs: object) -> psycopg.Connection:
    """One connection with the service's settings (no server-side prepared statements,
    so it also works through Supabase's pooler in transaction mode)."""
    return psycopg.connect(url, prepare_threshold=None, row_factory=dict_row, **kwargs)


def open_pool(url: str, min_size: int, max_size: int, statement_timeout_ms: int) -> ConnectionPool:
    options = f"-c statement_timeout={statement_timeout_ms}" if statement_timeout_ms else ""
    pool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        check=lambda conn: check_idle(pool, conn),
        kwargs={"prepare_threshold": None, "row_factory": dict_row, "options": options},
        configure=TimeoutCheck(statement_timeout_ms),
        open=False,
        name="service",
    )
    pool.open(wait=False)
    return pool


class TimeoutCheck:
    """Checks each new pooled connection's statement timeout. A pooler (Supavisor, PgBouncer)
    may not pass the startup option on, and then the timeout silently is whatever the role
    has: say so, once per pool, with the remedy (set it on the role; docs/deploy.md)."""

    def __init__(self, expected_ms: int) -> None:
        self.expected_ms = expected_ms
        self.warned = False

    def __call__(self, conn: psycopg.Connection) -> None:
        row = conn.execute("SELECT setting::integer AS ms FROM pg_settings "
                           "WHERE name = 'statement_timeout'").fetchone()
        conn.rollback()  # the pool expects the connection back idle
        if row["ms"] != self.expected_ms and not self.warned:
            self.warned = True
            logger.warning("statement timeout is %s ms, not DB_STATEMENT_TIMEOUT_MS=%s: a pooler "
                           "dropped the startup option? set it on the role (ALTER ROLE ... SET "
                           "statement_timeout)", row["ms"], self.expected_ms,
                           extra={"action": "db_statement_timeout"})


def check_idle(pool: ConnectionPool, conn: psycopg.Connection) -> None:
    """Run as the pool hands out a connection. When the database restarts, every idle
    connection dies with it, and each would fail the request it is next given to, however
    much later. An idle connection the server closed is readable (the FATAL message, or
    end of file); only then does this ask the server (an empty query), and when that fails
    it has the pool replace all its dead connections at once, not one failed request each.
    The pool then hands this request a new connection after a pause (about a second)."""
    readable = select.poll()  # not select.select: it fails on descriptors above 1023
    readable.register(conn.fileno(), select.POLLIN)
    if not readable.poll(0):
        return  # nothing from the server: a poll costs microseconds, a round trip ~50 us
    try:
        ConnectionPool.check_connection(conn)
    except psycopg.Error:
        logger.warning("the database closed the pooled connections; replacing them",
                       extra={"action": "db_reconnect"})
        pool.check()
        raise


@contextmanager
def translated_errors() -> Iterator[None]:
    """Map database constraint failures to the service's named errors, in one place."""
    try:
        yield
    except psycopg.errors.CheckViolation as exc:
        constraint = exc.diag.constraint_name or "a check"
        raise InvalidEvent(f"the event store refused the event ({constraint})") from exc
    except psycopg.errors.InvalidDatetimeFormat as exc:
        raise InvalidEvent(f"a timestamp in the event is not valid: {exc.diag.message_primary}") from exc
    except psycopg.errors.InvalidTextRepresentation as exc:
        raise InvalidEvent(f"a value in the event is not valid: {exc.diag.message_primary}") from exc
    except psycopg.DataError as exc:  # e.g. \u0000 in JSON text, a number jsonb cannot hold
        detail = f" ({exc.diag.message_detail})" if exc.diag.message_detail else ""
        raise InvalidEvent(f"the event cannot be stored: {exc.diag.message_primary}{detail}") from exc
    except psycopg.OperationalError as exc:
        raise ServiceError(f"database unavailable: {exc}") from exc
