"""What both benchmarks share: a scratch database, the real Replicate payloads as templates."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a plain script: make `service` importable
    sys.path.insert(0, str(ROOT))

from service import db, migrations  # noqa: E402

PAYLOADS = ROOT / "tests" / "fixtures" / "replicate" / "payloads"
# The ceiling baselines' table (append.py, append_instructions.py, ingest.py): a copy of the
# events table with its columns, keys, indexes, checks and compression, and no fold.
# events is partitioned since migration 017 and its keys are unique through event_keys: the
# copy is one plain table, with the key unique in it, as events was.
RECORDED_TABLE = "CREATE TABLE recorded_events (LIKE events INCLUDING ALL, UNIQUE (event_key))"

# One SDXL prediction's states as Replicate reported them, and how some end instead.
TEMPLATES = {
    "starting": "starting_sdxl_create_response",
    "processing": "processing_sdxl_partial_logs",
    "more_logs": "processing_sdxl_more_logs",
    "succeeded": "succeeded_sdxl_polled_list_output",
    "failed": "failed_flux11pro_nsfw_with_traceback_logs",
    "canceled": "canceled_sdxl_after_start",
}
PROMPTS = [
    "a studio photo of a rainbow colored corgi",
    "A chariot pulled by a team of six rainbow unicorns",
    "a lighthouse on a cliff at dusk, volumetric light, 35mm film",
    "isometric cutaway of a tiny bakery, warm morning light",
    "portrait of an astronaut cat, renaissance oil painting",
]


def templates() -> dict[str, dict[str, Any]]:
    """The real payloads (tests/fixtures/replicate/payloads) the generated bodies are made from."""
    return {name: json.loads((PAYLOADS / f"{file}.json").read_text()) for name, file in TEMPLATES.items()}


def backend_cpu_seconds(pid: int) -> float:
    """The CPU seconds (user and system) a backend on this machine has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@contextmanager
def server(database_url: str | None) -> Iterator[tuple[str, str]]:
    """(maintenance URL, description) of DATABASE_URL's server, or of an embedded one in a temp dir."""
    if database_url:
        yield with_database(database_url, "postgres"), "DATABASE_URL server"
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp:
        embedded = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="delete")
        try:
            yield embedded.get_uri(), f"embedded pgserver in {tmp}"
        finally:
            embedded.cleanup()


@contextmanager
def scratch_database(server_url: str, name: str, sql_dir: Path | None = None,
                     keep: bool = False, reuse: bool = False) -> Iterator[str]:
    """A new database migrated by sql_dir (default: this checkout's sql/), dropped afterwards
    whatever happens, unless kept. With reuse, one kept by an earlier run is migrated again
    (the SQL may have changed since) and used as it is, if it exists."""
    with psycopg.connect(server_url, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not (reuse and exists):
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    try:
        with db.connect(url, autocommit=True) as conn:
            migrations.migrate(conn, sql_dir or migrations.SQL_DIR)
        yield url
    finally:
        if keep:
            print(f"  kept the database {name} (drop it with DROP DATABASE \"{name}\")", flush=True)
        else:
            with psycopg.connect(server_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def server_version(url: str) -> str:
    with psycopg.connect(url) as conn:
        return conn.execute("SHOW server_version").fetchone()[0]


def default_database_url() -> str | None:
    return os.environ.get("DATABASE_URL", "").strip() or None


def add_database_url(parser: argparse.ArgumentParser) -> None:
    """--database-url: the server a benchmark makes its scratch database on."""
    parser.add_argument("--database-url", default=default_database_url(),
                        help="server to create the scratch database on (default: DATABASE_URL, "
                             "else an embedded pgserver)")
