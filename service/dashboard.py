"""The dashboard: its page at / and the JSON it reads under /api/dashboard.

The page is static files (service/static: index.html and assets/), the same files
netlify.toml publishes, so it works served by the app or from a CDN in front of it. It
reads jobs through the jobs API and everything else here: webhook health, search,
models, a job's timeline and outputs, raw events, and a stream of job changes.
"""

from __future__ import annotations

import re
import threading
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from flask import Blueprint, Response, current_app, request, send_from_directory
from flask.blueprints import BlueprintSetupState
from psycopg_pool import ConnectionPool

from service import changes, storage
from service.auth import Unauthorized, credential_configured, key_matches
from service.db import queries
from service.errors import NotFound, ServiceError
from service.jobs import InvalidRequest
from service.schemas import JOB_STATUSES, POSTPROCESS_MODES

bp = Blueprint("dashboard", __name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSETS_DIR = STATIC_DIR / "assets"
PUBLIC_ENDPOINTS = {"dashboard.index", "dashboard.asset", "dashboard.config"}
HEX_PREFIX = re.compile(r"^[0-9a-f-]{4,36}$")
HEX_TAIL = re.compile(r"^[0-9a-f]{4,12}$")  # within a uuid's last group
WINDOWS = (15, 60, 360, 1440)  # minutes the health panel can look back
BUCKETS = 30
# Each open stream holds a thread and a database connection for its lifetime; beyond this
# many per process, browsers are told to poll instead (503).
STREAMS_PER_PROCESS = 4


class StreamsBusy(ServiceError):
    """Too many live streams are open; poll instead."""

    code = "streams_busy"
    status = 503


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    limit = state.app.config.get("DASHBOARD_STREAMS", STREAMS_PER_PROCESS)
    state.app.extensions["dashboard_streams"] = threading.BoundedSemaphore(limit)


@bp.before_request
def _authenticate() -> None:
    keys = current_app.config.get("API_KEYS") or ()
    if _locked() and request.endpoint not in PUBLIC_ENDPOINTS and not key_matches(request.headers, keys):
        raise Unauthorized()


def _locked() -> bool:
    """The dashboard is the operators' (every job): with any credential configured it needs
    an API key; Supabase user tokens alone open only the jobs API, each to its own jobs."""
    return credential_configured(current_app.config)


@bp.after_request
def _headers(response: Response) -> Response:
    if response.status_code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="api"'
    if request.endpoint in {"dashboard.index", "dashboard.asset"}:
        response.headers["Content-Security-Policy"] = content_security_policy(current_app.config)
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-cache"
    return response


def content_security_policy(config: dict[str, Any]) -> str:
    """No inline script or style; images from here, stored outputs (PUBLIC_BASE_URL's /files,
    Supabase Storage) and where outputs come from; connections to this origin only (the API
    and its event stream)."""
    images = ["'self'", "data:", "https://replicate.delivery", "https://*.replicate.delivery"]
    images += [f"http://{h}:* https://{h}:*" for h in _hosts(config.get("OUTPUT_ALLOWED_HOSTS"))]
    images += [o for o in (_origin(config.get(n)) for n in ("PUBLIC_BASE_URL", "SUPABASE_URL")) if o]
    return "; ".join([
        "default-src 'self'", "script-src 'self'", "style-src 'self'", f"img-src {' '.join(images)}",
        "connect-src 'self'", "object-src 'none'", "base-uri 'none'",
        "form-action 'self'", "frame-ancestors 'none'"])


def _hosts(raw: object) -> list[str]:
    return [h.strip() for h in str(raw or "").split(",") if re.fullmatch(r"[A-Za-z0-9.-]+", h.strip())]


def _origin(url: object) -> str | None:
    parts = urlsplit(str(url or ""))
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") and parts.netloc else None


def _pool() -> ConnectionPool:
    return current_app.extensions["db_pool"]


@bp.get("/")
def index() -> Response:
    return send_from_directory(STATIC_DIR, "index.html")


@bp.get("/assets/<path:name>")
def asset(name: str) -> Response:
    return send_from_directory(ASSETS_DIR, name)


@bp.get("/api/dashboard/config")
def config() -> dict:
    """What the page needs before anything else; public, like the page itself."""
    cfg = current_app.config
    return {"auth_required": _locked(), "stream": "/api/dashboard/stream",
            "reconcile_after_seconds": cfg["RECONCILE_AFTER_SECONDS"],
            "statuses": list(JOB_STATUSES), "postprocess_modes": list(POSTPROCESS_MODES),
            "health_windows": list(WINDOWS)}


@bp.get("/api/dashboard/health")
def health() -> dict:
    minutes = _choice("minutes", WINDOWS, 60)
    with _pool().connection() as conn:
        return webhook_health(conn, minutes, current_app.config["RECONCILE_AFTER_SECONDS"],
                              current_app.config["EVENTS_RAW_RETENTION_DAYS"])


def webhook_health(conn: psycopg.Connection, minutes: int, stuck_after: int,
                   retention_days: int) -> dict[str, Any]:
    """Webhooks per minute, refusals, duplicates, ack time, stuck jobs, jobs by status, and the
    store: its size, the delivery log's oldest day, when retention last ran."""
    row = conn.execute(queries["dashboard_webhook_health"], {"minutes": minutes}).fetchone()
    bucket = minutes * 60 // BUCKETS
    series = conn.execute(queries["dashboard_webhook_series"],
                          {"bucket_seconds": bucket, "buckets": BUCKETS}).fetchall()
    stuck = conn.execute(queries["dashboard_stuck_jobs"],
                         {"stuck_after": stuck_after, "limit": 10}).fetchall()
    counts = conn.execute(queries["status_counts"]).fetchall()
    kept = conn.execute(queries["dashboard_store"]).fetchone()
    unrecorded = row["unrecorded"]
    return {
        "window_minutes": minutes, "at": row["at"].isoformat(),
        "webhooks": {"recorded": row["recorded"], "per_minute": round(row["recorded"] / minutes, 2),
                     "bucket_seconds": bucket,
                     "series": [{"start": s["start"].isoformat(), "recorded": s["recorded"],
                                 "unrecorded": s["unrecorded"]} for s in series]},
        "signature_failures": unrecorded.get("bad_signature", 0),
        "duplicates": unrecorded.get("duplicate", 0),
        "unrecorded": unrecorded,
        "ack_ms": {"p50": _number(row["ack_ms_p50"]), "p95": _number(row["ack_ms_p95"]),
                   "samples": row["ack_samples"]},
        "stuck": {"threshold_seconds": stuck_after, "count": stuck[0]["total"] if stuck else 0,
                  "jobs": [{"id": str(j["id"]), "status": j["status"], "model": j["model"],
                            "updated_at": j["updated_at"].isoformat()} for j in stuck]},
        "status_counts": {c["status"]: c["n"] for c in counts},
        "store": {"events_bytes": kept["events_bytes"], "deliveries_bytes": kept["deliveries_bytes"],
                  "database_bytes": kept["database_bytes"], "event_partitions": kept["event_partitions"],
                  "deliveries_oldest": _iso(kept["deliveries_oldest"]),
                  "retention_days": retention_days,
                  "pruned_at": _iso(kept["pruned_at"]), "pruned_bytes": kept["pruned_bytes"]},
    }


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


@bp.get("/api/dashboard/models")
def models() -> dict:
    with _pool().connection() as conn:
        return {"models": [r["model"] for r in conn.execute(queries["dashboard_models"])]}


@bp.get("/api/dashboard/search")
def search() -> dict:
    """Jobs whose id starts with q (at least 4 hex digits) or ends with it (4 to 12 digits: the
    dashboard shows a job's last 8), and the prediction whose id is q."""
    q = request.args.get("q", "").strip()
    if not q or len(q) > 200:
        raise InvalidRequest({"q": ["give a job id (its first 4+ or last 4+ characters) or a prediction id"]})
    with _pool().connection() as conn:
        return find(conn, q)


def find(conn: psycopg.Connection, q: str, limit: int = 10) -> dict[str, Any]:
    found: dict[str, Any] = {"jobs": [], "predictions": []}
    jobs: dict[str, dict[str, Any]] = {}
    low_high = uuid_range(q)
    if low_high:
        for r in conn.execute(queries["dashboard_search_jobs"],
                              {"low": low_high[0], "high": low_high[1], "limit": limit}):
            jobs[str(r["id"])] = r
    tail = q.lower()
    if HEX_TAIL.match(tail) and len(jobs) < limit:  # else the prefix's matches fill the answer
        even = tail[len(tail) % 2:]
        for r in conn.execute(queries["dashboard_search_job_tails"],
                              {"tail": tail, "even": even, "bytes": len(even) // 2, "limit": limit}):
            jobs.setdefault(str(r["id"]), r)
    found["jobs"] = [{**r, "id": job_id, "created_at": r["created_at"].isoformat()}
                     for job_id, r in list(jobs.items())[:limit]]
    rows = conn.execute(queries["dashboard_search_predictions"], {"id": q}).fetchall()
    found["predictions"] = [{**r, "job_id": r["job_id"] and str(r["job_id"]),
                             "first_seen_at": r["first_seen_at"].isoformat()} for r in rows]
    return found


def uuid_range(prefix: str) -> tuple[str, str] | None:
    """The smallest and largest uuid starting with these hex digits (dashes ignored)."""
    text = prefix.lower()
    if not HEX_PREFIX.match(text):
        return None
    digits = text.replace("-", "")
    if len(digits) > 32:
        return None
    return str(uuid.UUID(digits.ljust(32, "0"))), str(uuid.UUID(digits.ljust(32, "f")))


@bp.get("/api/dashboard/jobs/<uuid:job_id>/timeline")
def timeline(job_id: uuid.UUID) -> dict:
    limit = 1000
    with _pool().connection() as conn:
        rows = conn.execute(queries["dashboard_timeline"], {"stream": str(job_id), "limit": limit}).fetchall()
    if not rows:
        raise NotFound(f"no job {job_id}")
    return {"total": rows[0]["total"], "limit": limit,
            "events": [{k: _json(v) for k, v in r.items() if k != "total"} for r in rows]}


@bp.get("/api/dashboard/jobs/<uuid:job_id>/outputs")
def outputs(job_id: uuid.UUID) -> dict:
    with _pool().connection() as conn:
        rows = conn.execute(queries["dashboard_outputs"], {"job_id": str(job_id)}).fetchall()
    shown = [{k: _json(v) for k, v in r.items()} for r in rows]
    storage.show_urls(current_app.extensions.get("storage"), shown, ("url", "original_url"))
    return {"outputs": shown}


@bp.get("/api/dashboard/events/<int:position>")
def event(position: int) -> dict:
    with _pool().connection() as conn:
        row = conn.execute(queries["dashboard_event"], {"position": position}).fetchone()
    if row is None:
        raise NotFound(f"no event at position {position}")
    return {k: _json(v) for k, v in row.items()}


@bp.get("/api/dashboard/stream")
def stream() -> Response:
    """Server-Sent Events: which jobs changed (see service/changes.py)."""
    slots: threading.BoundedSemaphore = current_app.extensions["dashboard_streams"]
    if not slots.acquire(blocking=False):
        raise StreamsBusy()
    cfg = current_app.config
    settings = changes.FeedSettings(**cfg.get("DASHBOARD_FEED", {}))
    response = Response(changes.job_changes(cfg["DATABASE_URL"], settings), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    released = threading.Event()

    def release() -> None:  # close may be called more than once
        if not released.is_set():
            released.set()
            slots.release()

    response.call_on_close(release)
    return response


def _choice(name: str, allowed: tuple[int, ...], default: int) -> int:
    raw = request.args.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) not in allowed:
        raise InvalidRequest({name: [f"must be one of {', '.join(map(str, allowed))}"]})
    return int(raw)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _json(value: Any) -> Any:
    """A column value as JSON: uuids as text, timestamps as ISO 8601, numerics as numbers."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value
