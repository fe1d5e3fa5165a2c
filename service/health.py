"""GET /healthz: is the database reachable and migrated? GET /readyz: should this process
get traffic: the database answers, every migration in sql/ is applied, and the process
is not shutting down (gunicorn.conf.py sets that flag when a worker gets SIGTERM)."""

from __future__ import annotations

import logging
import threading
from functools import cache

import psycopg
from flask import Blueprint, Flask, current_app

from service import migrations
from service.db import queries

logger = logging.getLogger(__name__)

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> tuple[dict, int]:
    try:
        with current_app.extensions["db_pool"].connection(timeout=5) as conn:
            migrations_applied = conn.execute(queries["database_ok"]).fetchone()["migrations"]
    except (psycopg.Error, OSError) as exc:
        logger.warning("health check failed: %s", exc, extra={"action": "healthz"})
        return {"status": "unavailable", "database": "unreachable"}, 503
    return {"status": "ok", "database": "ok", "migrations": migrations_applied}, 200


@bp.get("/readyz")
def readyz() -> tuple[dict, int]:
    if shutting_down(current_app).is_set():
        return {"status": "unavailable", "reason": "shutting down"}, 503
    try:
        with current_app.extensions["db_pool"].connection(timeout=2) as conn:
            applied = {row["version"] for row in conn.execute(queries["readiness"]).fetchall()}
    except (psycopg.Error, OSError) as exc:
        logger.warning("readiness check failed: %s", exc, extra={"action": "readyz"})
        return {"status": "unavailable", "reason": "database unreachable"}, 503
    missing = sorted(expected_migrations() - applied)
    if missing:
        return {"status": "unavailable", "reason": "migrations not applied", "missing": missing}, 503
    return {"status": "ready", "migrations": len(applied)}, 200


@cache
def expected_migrations() -> frozenset[str]:
    """The versions of the sql/migrations/NNN_*.sql files this code was shipped with."""
    return frozenset(m.version for m in migrations.discover())


def shutting_down(app: Flask) -> threading.Event:
    """Set once the process has been asked to stop: /readyz answers 503 from then on."""
    return app.extensions.setdefault("shutting_down", threading.Event())
