"""Which jobs changed, as Server-Sent Events for the dashboard's live updates.

The feed LISTENs on `jobs_changed` (NOTIFY from the trigger in sql/dashboard.sql) on a
connection of its own, never one of the pool's: a listening connection stays busy for the
whole stream. Where LISTEN does not work (a transaction-mode pooler hands each statement
to whichever server connection is free, so a notification may never reach us), it polls
for the events recorded since its last look instead. Whether LISTEN works is not guessed
from the URL: the feed sends itself a probe notification and listens only if the probe
comes back.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

from service.db import connect, queries

logger = logging.getLogger(__name__)

CHANNEL = "jobs_changed"
EVERYTHING = "*"
# Past this many jobs in one burst, say "everything changed": the page refetches its view anyway.
MAX_IDS = 50
# How long to gather a burst of notifications into one event (a batch job changes many at once).
COALESCE_SECONDS = 0.2
# updated_at is the event's recording time, and a transaction may commit a little after it:
# the poller looks back this far and skips what it already reported.
POLL_OVERLAP = timedelta(seconds=5)


@dataclass(frozen=True)
class FeedSettings:
    lifetime: float = 300.0      # seconds before the stream ends and the browser reconnects
    heartbeat: float = 15.0      # seconds between comments that keep proxies from timing out
    poll_every: float = 2.0      # seconds between polls when LISTEN is unavailable
    listen: bool = True          # False: always poll (tests, or a pooler known to drop NOTIFY)
    probe_timeout: float = 5.0   # seconds to wait for our own probe notification


def sse(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def job_changes(url: str, settings: FeedSettings) -> Iterator[str]:
    """The stream: `ready` (its mode), then `jobs` events ({"ids": [...]}, "*" for all)
    and heartbeat comments, then `end` when its lifetime is over or the database is lost."""
    yield "retry: 2000\n\n"
    deadline = time.monotonic() + settings.lifetime
    reason = "lifetime"
    try:
        with connect(url, autocommit=True) as conn:
            watcher = _watcher(conn, settings)
            yield sse("ready", {"mode": watcher.mode, "lifetime": settings.lifetime})
            while (left := deadline - time.monotonic()) > 0:
                ids = watcher.wait(min(settings.heartbeat, left))
                yield sse("jobs", {"ids": ids}) if ids else ": keep-alive\n\n"
    except psycopg.Error as exc:
        logger.warning("change feed stopped: %s", exc, extra={"action": "change_feed"})
        reason = "database"
    yield sse("end", {"reason": reason})


def _watcher(conn: psycopg.Connection, settings: FeedSettings) -> Listener | Poller:
    if settings.listen:
        listener = Listener(conn, settings.heartbeat)
        if listener.start(settings.probe_timeout):
            return listener
    return Poller(conn, settings.poll_every)


class Listener:
    mode = "listen"

    def __init__(self, conn: psycopg.Connection, heartbeat: float) -> None:
        self.conn = conn
        self.pending: set[str] = set()
        # the trigger notifies only while someone listens (sql/dashboard.sql): say so for
        # a little longer than until the next heartbeat renews it
        self.announce_for = 2 * heartbeat + 5

    def start(self, probe_timeout: float) -> bool:
        """LISTEN, then check a notification really comes back to this connection."""
        probe = f"probe:{uuid.uuid4()}"
        try:
            self.conn.execute(f"LISTEN {CHANNEL}")
            self._announce()
            self.conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, probe))
            deadline = time.monotonic() + probe_timeout
            while (left := deadline - time.monotonic()) > 0:
                for note in self.conn.notifies(timeout=left, stop_after=1):
                    if note.payload == probe:
                        return True
                    self._take(note.payload)
        except psycopg.Error as exc:
            logger.info("no LISTEN for the change feed (%s); polling", exc, extra={"action": "change_feed"})
            return False
        logger.info("LISTEN probe did not come back; polling", extra={"action": "change_feed"})
        return False

    def wait(self, timeout: float) -> list[str]:
        self._announce()
        if not self.pending:
            for note in self.conn.notifies(timeout=timeout, stop_after=1):
                self._take(note.payload)
        if self.pending:  # gather the rest of a burst into the same event
            for note in self.conn.notifies(timeout=COALESCE_SECONDS):
                self._take(note.payload)
        found, self.pending = _report(self.pending), set()
        return found

    def _announce(self) -> None:
        self.conn.execute(queries["jobs_feed_listen"], {"seconds": self.announce_for})

    def _take(self, payload: str) -> None:
        if not payload.startswith("probe:"):  # other streams' probes reach every listener
            self.pending.add(payload)


class Poller:
    mode = "poll"

    def __init__(self, conn: psycopg.Connection, every: float) -> None:
        self.conn, self.every = conn, every
        self.since: datetime = conn.execute("SELECT now() AS t").fetchone()["t"]
        self.seen: dict[str, datetime] = {}

    def wait(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(self.every, left))
            changed = self._poll()
            if changed:
                return _report(changed)
        return []

    def _poll(self) -> set[str]:
        rows = self.conn.execute(queries["jobs_changed_since"],
                                 {"since": self.since - POLL_OVERLAP, "limit": 500}).fetchall()
        changed = {r["id"] for r in rows if self.seen.get(r["id"]) != r["updated_at"]}
        self.seen.update((r["id"], r["updated_at"]) for r in rows)
        if rows:
            self.since = max(self.since, rows[-1]["updated_at"])
        horizon = self.since - POLL_OVERLAP
        self.seen = {k: v for k, v in self.seen.items() if v >= horizon}
        return {EVERYTHING} if len(rows) == 500 else changed


def _report(ids: set[str]) -> list[str]:
    return [EVERYTHING] if EVERYTHING in ids or len(ids) > MAX_IDS else sorted(ids)
