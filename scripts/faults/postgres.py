"""A PostgreSQL of the fault run's own, which it may crash and restart.

Never the shared server on 127.0.0.1:5432 (other people's tests use it) and never
DATABASE_URL: pgserver's binaries, a data directory in a temp dir, a Unix socket in it
(no TCP port at all), stopped and deleted whatever happens.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from service.db import import_pgserver

logger = logging.getLogger(__name__)


class PrivatePostgres:
    """One embedded server in `root`; restart() crashes it (-m immediate) and starts it again."""

    def __init__(self, root: Path) -> None:
        self.server = import_pgserver().get_server(root / "pgdata", cleanup_mode="delete")
        self.pgdata = Path(self.server.pgdata)
        self.url = self.server.get_uri()
        self.restarts = 0

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", *args], pgdata=self.pgdata, user=self.server.system_user, timeout=timeout)

    def restart(self, mode: str = "immediate") -> float:
        """Stop the server (immediate: a crash, recovered from the WAL on start) and start it
        again with the same options; returns the seconds it was unreachable."""
        started = time.monotonic()
        self._pg_ctl("-m", mode, "-l", str(self.pgdata / "restart.log"), "restart")
        self.wait_ready(30)
        self.restarts += 1
        # pgserver stops the postmaster it knows of at cleanup: tell it of the new one
        from pgserver.utils import PostmasterInfo

        self.server._postmaster_info = PostmasterInfo.read_from_pgdata(self.pgdata)
        return time.monotonic() - started

    def wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server and delete its data directory."""
        self.server.cleanup()


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    with tempfile.TemporaryDirectory(prefix="faults-pg-") as tmp:
        server = PrivatePostgres(Path(tmp))
        try:
            yield server
        finally:
            server.stop()
