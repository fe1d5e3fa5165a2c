"""GET /: the job list, read from the projection only, refreshed by hand."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

from service.db import queries

bp = Blueprint("dashboard", __name__)


@bp.get("/")
def index() -> str:
    with current_app.extensions["db_pool"].connection() as conn:
        jobs = conn.execute(queries["recent_jobs"], {"limit": 100}).fetchall()
        counts = conn.execute(queries["status_counts"]).fetchall()
    return render_template("dashboard.html", jobs=jobs, counts=counts)
