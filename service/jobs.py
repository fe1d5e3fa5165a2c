"""The jobs API under /api: create, read, list, cancel jobs, and their events.

Reads come from the projections only and never call Replicate; writes record an event
and enqueue the work for the worker (service/commands.py), in one transaction.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from functools import cache
from typing import Any

import psycopg
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Response, current_app, g, request
from marshmallow import Schema, ValidationError
from psycopg_pool import ConnectionPool

from service import commands, costs, events, schemas, storage
from service.auth import Caller, Unauthorized, authenticate
from service.db import queries
from service.errors import NotFound, ServiceError
from service.webhooks import read_body

logger = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/api")


class InvalidJson(ServiceError):
    """The request body must be a JSON object."""

    code = "invalid_json"
    status = 400


class InvalidRequest(ServiceError):
    """The request is not valid."""

    code = "invalid_request"
    status = 422

    def __init__(self, fields: dict[str, list[str]], message: str | None = None) -> None:
        self.fields = fields
        super().__init__(message or f"invalid: {', '.join(sorted(fields))}")


class Forbidden(ServiceError):
    """The caller may not do this."""

    code = "forbidden"
    status = 403


@bp.errorhandler(InvalidRequest)
def _invalid_request(exc: InvalidRequest) -> tuple[dict, int]:
    return {"error": exc.code, "message": exc.message, "fields": exc.fields}, exc.status


@bp.before_request
def _authenticate() -> None:
    if request.endpoint == "jobs.openapi_json":
        return
    try:
        g.caller = authenticate(request.headers, current_app.config.get("API_KEYS") or (),
                                current_app.extensions.get("user_tokens"))
    except Unauthorized as exc:
        logger.info("request refused: %s", exc.message, extra={"action": "authenticate",
                                                               "path": request.path})
        raise


def _owner() -> str | None:
    """The user whose jobs this request may see; None for an API key (every job)."""
    caller: Caller = g.caller
    return caller.user_id


def new_job_owner(caller: Caller, named: uuid.UUID | None) -> str | None:
    """Whose job a create makes. A signed-in user's job is theirs; naming anyone else is
    Forbidden. An API key (or an open API: local work) may name any user, or no one."""
    if caller.user_id is None:
        return str(named) if named else None
    if named is not None and str(named) != caller.user_id:
        logger.info("owner refused", extra={"action": "create_job_owner", "user_id": caller.user_id})
        raise Forbidden("a signed-in user's jobs are their own: `owner` may name only you; "
                        "only an API key may create a job for another user")
    return caller.user_id


@bp.after_request
def _challenge(response: Response) -> Response:
    if response.status_code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="api"'
    return response


def _pool() -> ConnectionPool:
    return current_app.extensions["db_pool"]


def json_object() -> dict[str, Any]:
    """The request body as a JSON object, or InvalidJson."""
    try:
        # read_body: 413 on a declared length over the limit before reading, and a chunked
        # body is cut off just past it (request.max_content_length would silently truncate it)
        body = json.loads(read_body(schemas.MAX_BODY_BYTES), parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidJson(f"the body must be a JSON object, not {type(body).__name__}")
    return body


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def load(schema: Schema, data: dict[str, Any]) -> dict[str, Any]:
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise InvalidRequest(schemas.flatten(exc.messages)) from None


def idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not schemas.IDEMPOTENCY_KEY_RE.match(key):
        raise InvalidRequest({"Idempotency-Key": [
            f"must be 1 to {schemas.MAX_IDEMPOTENCY_KEY} printable ASCII characters"]})
    return key


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """A jobs row with its progress, ready for JobSummarySchema / JobSchema."""
    return {**row, "progress": {
        "total": row["predictions_expected"], "succeeded": row["predictions_succeeded"],
        "failed": row["predictions_failed"], "processed": row["outputs_processed"]}}


def job_view(conn: psycopg.Connection, job_id: uuid.UUID | str, owner: str | None = None) -> dict[str, Any]:
    """A job as the API shows it, from the projections; NotFound when there is none (or,
    with an owner, when it is another user's: their jobs do not exist for this one)."""
    bounds = events.job_stream(conn, job_id)
    row = conn.execute(queries["job_view"], {"id": str(job_id), "owner": owner, **bounds}).fetchone()
    if row is None:
        raise NotFound(f"no job {job_id}")
    predictions = conn.execute(queries["job_predictions_view"], {"job_id": str(job_id)}).fetchall()
    _costed(conn, [row])
    current = [p for p in predictions if not p["superseded"]]  # what the job's counts count
    return schemas.JobSchema().dump({**_shown(row), "predictions": predictions,
                                     "steps": steps(row, current)})


def _costed(conn: psycopg.Connection, rows: list[dict[str, Any]]) -> None:
    """Each job row gets its cost: compute seconds, and dollars where REPLICATE_PRICES says."""
    groups = conn.execute(queries["job_compute"], {"ids": [str(r["id"]) for r in rows]}).fetchall()
    prices = costs.parse_prices(current_app.config.get("REPLICATE_PRICES"))
    for row in rows:
        row["cost"] = costs.job_cost((g for g in groups if g["job_id"] == str(row["id"])), prices)


_FAILED = ("failed", "canceled", "aborted")


def steps(row: dict[str, Any], predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job's progress per step. A prediction without a step counts in step 1, as in the
    fold (sql/fold.sql, job_step_rollups); step 2, when `then` is set, runs one prediction."""
    then, expected = row["next_step"], row["predictions_expected"]
    totals = {1: expected - 1, 2: 1} if then is not None else {1: expected}
    targets = {1: row, 2: then or {}}
    return [{"step": n, "target": _target(targets[n]), "total": total,
             "succeeded": sum(1 for p in predictions if (p["step"] or 1) == n and p["status"] == "succeeded"),
             "failed": sum(1 for p in predictions if (p["step"] or 1) == n and p["status"] in _FAILED),
             "processed": sum(1 for o in row["outputs"] if o.get("step", 1) == n)}
            for n, total in totals.items()]


def _target(spec: dict[str, Any]) -> str | None:
    return spec.get("model") or spec.get("deployment") or spec.get("version")


def create(conn: psycopg.Connection, spec: dict[str, Any], key: str | None,
           owner: str | None = None) -> tuple[dict[str, Any], bool]:
    """Record the job (or find the one this Idempotency-Key made) and show it. Without a
    cancel_after of its own, a job gets JOB_CANCEL_AFTER's (checked at startup)."""
    if spec.get("cancel_after") is None and current_app.config.get("JOB_CANCEL_AFTER"):
        spec = {**spec, "cancel_after": schemas.duration_seconds(current_app.config["JOB_CANCEL_AFTER"])}
    job_id, created = commands.create_job(conn, spec, key, owner_id=owner)
    if not created:
        recorded = conn.execute(queries["job_created_data"], events.job_stream(conn, job_id)).fetchone()
        if recorded is None or recorded["data"] != recorded_spec(spec, owner):
            raise InvalidRequest({"Idempotency-Key": ["was used before for a different request"]},
                                 "the Idempotency-Key was used before for a different request")
    return job_view(conn, job_id, owner), created


def recorded_spec(spec: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
    """The job.created data commands.create_job records for this spec."""
    return json.loads(json.dumps(commands.job_data(spec, owner)))


def job_page(conn: psycopg.Connection, args: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
    """One page of jobs (the owner's, when given), newest first, and the next page's cursor."""
    after = args["cursor"] or (None, None)
    rows = conn.execute(queries["list_jobs"], {
        "status": args["status"], "model": args["model"], "limit": args["limit"] + 1, "owner": owner,
        "after_created_at": after[0], "after_id": after[1] and str(after[1]),
    }).fetchall()
    more, rows = len(rows) > args["limit"], rows[:args["limit"]]
    if rows:
        _costed(conn, rows)
    cursor = schemas.Cursor.encode(rows[-1]["created_at"], rows[-1]["id"]) if more else None
    return schemas.JobListSchema().dump({"jobs": [_shown(r) for r in rows], "next_cursor": cursor})


def job_events(conn: psycopg.Connection, job_id: uuid.UUID, owner: str | None = None) -> dict[str, Any]:
    if owner:
        visible(conn, job_id, owner)
    rows = conn.execute(queries["job_events"], events.job_stream(conn, job_id)).fetchall()
    if not rows:
        raise NotFound(f"no job {job_id}")
    return schemas.EventListSchema().dump({"events": rows})


def visible(conn: psycopg.Connection, job_id: uuid.UUID, owner: str | None) -> None:
    """NotFound unless the job exists and, with an owner, is theirs."""
    if conn.execute(queries["job_visible"], {"id": str(job_id), "owner": owner}).fetchone() is None:
        raise NotFound(f"no job {job_id}")


def cancel(conn: psycopg.Connection, job_id: uuid.UUID, owner: str | None = None) -> dict[str, Any]:
    if owner:
        visible(conn, job_id, owner)
    commands.cancel_job(conn, str(job_id))
    return job_view(conn, job_id)


@bp.post("/jobs")
def create_job() -> tuple[dict, int, dict]:
    spec = load(schemas.JobRequestSchema(), json_object())
    owner = new_job_owner(g.caller, spec.pop("owner"))
    key = idempotency_key()
    with _pool().connection() as conn:
        job, created = create(conn, spec, key, owner)
    return _signed(job), 201 if created else 200, {"Location": f"{bp.url_prefix}/jobs/{job['id']}"}


@bp.get("/jobs")
def list_jobs() -> dict:
    args = load(schemas.JobListQuerySchema(), {k: v for k, v in request.args.items() if v != ""})
    with _pool().connection() as conn:
        page = job_page(conn, args, _owner())
    _signed(*page["jobs"])
    return page


@bp.get("/jobs/<uuid:job_id>")
def get_job(job_id: uuid.UUID) -> dict:
    with _pool().connection() as conn:
        return _signed(job_view(conn, job_id, _owner()))


@bp.get("/jobs/<uuid:job_id>/events")
def get_job_events(job_id: uuid.UUID) -> dict:
    with _pool().connection() as conn:
        return job_events(conn, job_id, _owner())


def retry(conn: psycopg.Connection, job_id: uuid.UUID,
          owner: str | None = None) -> tuple[dict[str, Any], bool]:
    """Retry a finished job's failed predictions (commands.retry_job); the job, and whether
    this call submitted anything (False: its latest retry round is still running)."""
    visible(conn, job_id, owner)
    _, retried = commands.retry_job(conn, str(job_id))
    return job_view(conn, job_id), bool(retried)


@bp.post("/jobs/<uuid:job_id>/retry")
def retry_job(job_id: uuid.UUID) -> tuple[dict, int]:
    with _pool().connection() as conn:
        job, submitted = retry(conn, job_id, _owner())
    return _signed(job), 202 if submitted else 200


@bp.post("/jobs/<uuid:job_id>/cancel")
def cancel_job(job_id: uuid.UUID) -> tuple[dict, int]:
    with _pool().connection() as conn:
        return _signed(cancel(conn, job_id, _owner())), 202


def _signed(*jobs: dict[str, Any]) -> dict[str, Any]:
    """The (first) job, its output URLs as the storage shows them (signed, for a private bucket)."""
    outputs = [o for job in jobs for o in job.get("outputs") or []]
    storage.show_urls(current_app.extensions.get("storage"), outputs)
    return jobs[0] if jobs else {}


@bp.get("/openapi.json")
def openapi_json() -> dict:
    return openapi_document()


def _op(summary: str, ok: int, schema: str | None, *errors: int, body: str | dict | None = None,
        params: list[dict] | None = None, public: bool = False) -> dict[str, Any]:
    """One OpenAPI operation answering JSON: `ok` with `schema`, each error with Error."""
    content = {"application/json": {"schema": schema}} if schema else None
    responses = {str(ok): {"description": "OK", **({"content": content} if content else {})}}
    for status in errors:
        responses[str(status)] = {"description": _ERRORS[status],
                                  "content": {"application/json": {"schema": "Error"}}}
    op: dict[str, Any] = {"summary": summary, "responses": responses, "parameters": params or []}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if public:
        op["security"] = []
    return op


_ERRORS = {400: "the body is not a JSON object (or, for webhooks, not a valid delivery)",
           401: "no valid API key (webhooks: the signature did not verify)",
           403: "a signed-in user named another user as `owner`", 404: "no such job",
           409: "cancel: the job has already finished; retry: not finished, canceled, or nothing to retry",
           413: "the body is too large",
           422: "invalid fields, named in `fields`", 503: "the database is unreachable"}
_JOB_ID = {"in": "path", "name": "job_id", "required": True, "schema": {"type": "string", "format": "uuid"}}
_IDEMPOTENCY = {"in": "header", "name": "Idempotency-Key", "required": False,
                "description": "at most 200 characters; a repeat returns the same job with 200",
                "schema": {"type": "string", "maxLength": schemas.MAX_IDEMPOTENCY_KEY}}
_WEBHOOK = [{"in": "header", "name": n, "required": True, "schema": {"type": "string"}}
            for n in ("webhook-id", "webhook-timestamp", "webhook-signature")] + [
           {"in": "query", "name": n, "required": False, "schema": {"type": "string"}}
           for n in ("job", "step")]


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3 document of /api, /webhooks/replicate and /healthz, from the schemas."""
    spec = APISpec("Replicate jobs service", "1.0.0", "3.0.3", plugins=[MarshmallowPlugin()],
                   security=[{"bearer": []}])
    spec.components.security_scheme("bearer", {
        "type": "http", "scheme": "bearer",
        "description": "one of API_KEYS (every job), or a Supabase user access token (the user's jobs)"})
    for name in ("JobRequest", "Job", "JobSummary", "JobList", "EventList", "Error"):
        spec.components.schema(name, schema=getattr(schemas, f"{name}Schema"))
    spec.path("/api/jobs", operations={
        "post": _op("Create a job", 201, "Job", 400, 401, 403, 413, 422, body="JobRequest",
                    params=[_IDEMPOTENCY]),
        "get": _op("List jobs, newest first", 200, "JobList", 401, 422,
                   params=[{"in": "query", "schema": schemas.JobListQuerySchema}])})
    spec.path("/api/jobs/{job_id}", operations={"get": _op("A job", 200, "Job", 401, 404, params=[_JOB_ID])})
    spec.path("/api/jobs/{job_id}/events", operations={
        "get": _op("A job's events in order", 200, "EventList", 401, 404, params=[_JOB_ID])})
    spec.path("/api/jobs/{job_id}/cancel", operations={
        "post": _op("Cancel a job", 202, "Job", 401, 404, 409, params=[_JOB_ID])})
    spec.path("/api/jobs/{job_id}/retry", operations={"post": _op(
        "Retry a finished job's failed, canceled or aborted predictions (200: its latest retry "
        "is still running, nothing new submitted)", 202, "Job", 401, 404, 409, params=[_JOB_ID])})
    spec.path("/api/openapi.json", operations={"get": _op("This document", 200, None, public=True)})
    spec.path("/webhooks/replicate", operations={"post": _op(
        "Receive a Replicate webhook (Standard Webhooks signature)", 200, None, 400, 401, 413,
        body={"type": "object", "description": "a Replicate prediction object"}, params=_WEBHOOK,
        public=True)})
    spec.path("/healthz", operations={
        "get": _op("Database reachable and migrated", 200, None, 503, public=True)})
    return spec.to_dict()
