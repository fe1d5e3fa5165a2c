"""GET /healthz: is the database reachable and migrated?"""

from __future__ import annotations

import logging

import psycopg
from flask import Blueprint, current_app

from service.db import queries

logger = logging.getLogger(__name__)

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> tuple[dict, int]:
    try:
        with current_app.extensions["db_pool"].connection(timeout=5) as conn:
            migrations = conn.execute(queries["database_ok"]).fetchone()["migrations"]
    except (psycopg.Error, OSError) as exc:
        logger.warning("health check failed: %s", exc, extra={"action": "healthz"})
        return {"status": "unavailable", "database": "unreachable"}, 503
    return {"status": "ok", "database": "ok", "migrations": migrations}, 200
