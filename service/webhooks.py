"""POST /webhooks/replicate: verify, record, acknowledge. Nothing else happens here:
no downloads, no image work, no calls to Replicate."""

from __future__ import annotations

import binascii
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Response, after_this_request, current_app, request
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service import events, metrics, unrecorded
from service.config import secret_problem
from service.db import translated_errors
from service.errors import InvalidEvent, ServiceError
from service.groups import GroupCommit

logger = logging.getLogger(__name__)

bp = Blueprint("webhooks", __name__, url_prefix="/webhooks")

STATUSES = frozenset({"starting", "processing", "succeeded", "failed", "canceled", "aborted"})
TIMESTAMPS = ("created_at", "started_at", "completed_at")
KEPT_HEADERS = ("webhook-id", "webhook-timestamp", "user-agent", "content-type", "content-length")


class BadSignature(ServiceError):
    """Webhook signature did not verify."""

    code = "bad_signature"
    status = 401


class BadWebhook(ServiceError):
    """The webhook body is not a Replicate prediction."""

    code = "bad_webhook"
    status = 400


class BodyTooLarge(ServiceError):
    """The webhook body is too large."""

    code = "body_too_large"
    status = 413


class SecretUnavailable(ServiceError):
    """The webhook signing secret is not configured and could not be fetched."""

    code = "secret_unavailable"
    status = 503


@bp.post("/replicate")
def replicate() -> tuple[dict, int]:
    started = time.perf_counter()
    metrics.WEBHOOKS_RECEIVED.inc()
    raw = read_body(current_app.config["WEBHOOK_MAX_BYTES"])
    signed = signature_headers(request.headers)
    verify_signature(signing_secret(), signed, raw)
    body = parse_prediction(raw)
    job = _job_param(request.args.get("job"))
    item = group_item(signed["webhook-id"], job, raw, body, _metadata(job))
    times = [started, time.perf_counter()]  # then the group's start and end (GroupCommit.submit)
    with translated_errors():  # the database's refusal of this webhook, raised here
        row = current_app.extensions["webhook_groups"].submit(item, times)
    times.append(time.perf_counter())
    elapsed = times[-1] - started
    status = "duplicate" if row["duplicate"] else "recorded"
    if row["duplicate"]:
        after_this_request(_count_duplicate)
    stages = Stages(request.environ, times)
    after_this_request(stages.on_response)
    (metrics.WEBHOOKS_DUPLICATE if row["duplicate"] else metrics.WEBHOOKS_RECORDED).inc()
    metrics.WEBHOOK_ACK_SECONDS.observe(elapsed)
    logger.info("webhook %s", status, extra={
        "action": "webhook", "webhook_id": signed["webhook-id"], "prediction_id": body["id"],
        "prediction_status": body["status"], "job_id": row["stream"] if job else None,
        "position": row["position"], "ms": round(elapsed * 1000, 1),
        "stages_ms": stages.milliseconds()})
    return {"status": status, "position": row["position"]}, 200


class Stages:
    """A recorded webhook's time, stage by stage (metrics.WEBHOOK_STAGES), from perf_counter
    readings: the handler's start, the webhook verified, its group started and recorded,
    the handler running again; the thread's taking up the request and its wait for a
    thread, when gunicorn.conf.py's worker stamped them in the environ; and the response
    written (when the WSGI server closes it). Observed into rjs_webhook_stage_seconds once
    the response is out, off the webhook's way."""

    __slots__ = ("seconds", "resumed")

    def __init__(self, environ: Mapping[str, Any], times: Sequence[float]) -> None:
        started, verified, group_started, recorded, self.resumed = times
        self.seconds = {"verify": verified - started, "group_wait": group_started - verified,
                        "database": recorded - group_started, "wake": self.resumed - recorded}
        if "gunicorn.taken_at" in environ:
            self.seconds["queue"] = environ["gunicorn.queued_seconds"]
            self.seconds["dispatch"] = started - environ["gunicorn.taken_at"]

    def milliseconds(self) -> dict[str, float]:
        return {stage: round(value * 1000, 2) for stage, value in self.seconds.items()}

    def on_response(self, response: Response) -> Response:
        response.call_on_close(self._written)
        return response

    def _written(self) -> None:
        self.seconds["respond"] = time.perf_counter() - self.resumed
        metrics.observe_stages(self.seconds)


def read_body(limit: int) -> bytes:
    """The raw body, refused (413) before it is read whole when it is over the limit."""
    if (request.content_length or 0) > limit:
        raise BodyTooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise BodyTooLarge(f"the body is over the limit of {limit} bytes")
    return raw


SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


def signature_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The three Standard Webhooks headers, "" when absent."""
    return {name: headers.get(name, "") for name in SIGNATURE_HEADERS}


def verify_signature(secret: str, headers: Mapping[str, str], raw: bytes) -> None:
    """Standard Webhooks verification over the raw bytes: any one valid v1 signature,
    timestamp within five minutes either way. Raises BadSignature saying why."""
    wanted = signature_headers(headers)
    missing = [name for name, value in wanted.items() if not value]
    if missing:
        raise BadSignature(f"missing header{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    try:
        _webhook(secret).verify(raw, wanted, json_parse=False)
    except WebhookVerificationError as exc:
        raise BadSignature(f"webhook signature did not verify: {exc}") from None
    except (ValueError, binascii.Error, UnicodeDecodeError):
        # malformed signature list or a body that is not UTF-8: cannot be Replicate's
        raise BadSignature("webhook signature did not verify: malformed signature or body") from None


@functools.lru_cache(maxsize=4)
def _webhook(secret: str) -> Webhook:
    """The verifier for a secret, made once: it decodes the secret's key as it is made.
    Malformed secrets raise here, every time (lru_cache keeps only results)."""
    return Webhook(secret)


def parse_prediction(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadWebhook("the body is not JSON") from None
    except RecursionError:  # a signed body can still be hostile: no 500, and no retrying it
        raise BadWebhook("the body is nested too deeply to be a prediction") from None
    if not isinstance(body, dict):
        raise BadWebhook("the body is not a JSON object")
    problems = list(_problems(body))
    if problems:
        raise BadWebhook("not a Replicate prediction: " + "; ".join(problems))
    return body


def _problems(body: dict[str, Any]) -> list[str]:
    found = []
    pid = body.get("id")
    if not isinstance(pid, str) or not pid.strip() or len(pid) > 200:
        found.append("`id` must be a non-empty string")
    status = body.get("status")
    if not isinstance(status, str) or status not in STATUSES:  # a dict is not hashable
        found.append(f"`status` must be one of {', '.join(sorted(STATUSES))}")
    for name in TIMESTAMPS:
        value = body.get(name)
        if value is not None and not _is_timestamp(value):
            found.append(f"`{name}` must be an RFC 3339 timestamp or null")
    return found


def _is_timestamp(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def group_item(webhook_id: str, job: str | None, raw: bytes, body: dict[str, Any],
               metadata: dict[str, Any]) -> bytes:
    """One webhook as an element of append_webhooks' JSON array. The body is the verified
    bytes as they are (PostgreSQL parses them), rather than serialised again after
    json.loads. Only a body that opens with `{` is certain to be the UTF-8 JSON text
    json.loads read (it also accepts a BOM or UTF-16/32); anything else takes the long
    way. json.loads read exactly one JSON value from those bytes, so they cannot reach
    out of their place in the array."""
    text = raw if raw[:1] == b"{" else json.dumps(body).encode()
    return b'{"webhook_id":%s,"job":%s,"metadata":%s,"body":%s}' % (
        json.dumps(webhook_id).encode(), json.dumps(job).encode(), json.dumps(metadata).encode(), text)


def record_groups(app: Flask) -> None:
    """Webhooks recorded together when they arrive together (service/groups.py)."""
    pool = app.extensions["db_pool"]

    def record(group: Sequence[bytes]) -> list[dict | Exception]:
        metrics.WEBHOOK_GROUP_SIZE.observe(len(group))
        return events.append_webhooks(pool, group)

    app.extensions["webhook_groups"] = GroupCommit(record)


def _job_param(value: str | None) -> str | None:
    """The ?job= of the webhook URL as a canonical uuid, or None when absent or malformed
    (the webhook is still recorded: the prediction may be known, or it is an orphan)."""
    try:
        return str(uuid.UUID(value)) if value else None
    except ValueError:
        return None


# Where each kept header is in the WSGI environ (as werkzeug's EnvironHeaders looks it up;
# read there directly: a missing header costs request.headers a raised exception).
_KEPT_ENVIRON = tuple(
    (name, key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}")
    for name, key in ((name, name.upper().replace("-", "_")) for name in KEPT_HEADERS))


def _metadata(job: str | None) -> dict[str, Any]:
    environ, args = request.environ, request.args
    return {
        "source": "replicate",
        "received_at": datetime.now(UTC).isoformat(),
        "headers": {name: environ[key] for name, key in _KEPT_ENVIRON if key in environ},
        "query": {"job": job, "step": args.get("step"), "index": args.get("index"),
                  **({"retry": args["retry"]} if "retry" in args else {})},
        "remote_addr": request.remote_addr,
    }


_secret_lock = threading.Lock()


def signing_secret() -> str:
    """REPLICATE_WEBHOOK_SECRET, else Replicate's default secret fetched once and cached."""
    config = current_app.config
    if config.get("REPLICATE_WEBHOOK_SECRET"):
        return config["REPLICATE_WEBHOOK_SECRET"]
    with _secret_lock:
        if not config.get("REPLICATE_WEBHOOK_SECRET"):
            config["REPLICATE_WEBHOOK_SECRET"] = fetch_secret(config)
    return config["REPLICATE_WEBHOOK_SECRET"]


def fetch_secret(config: Mapping[str, Any]) -> str:
    from service.replicate import from_settings  # the client is only needed here

    if not config.get("REPLICATE_API_TOKEN"):
        raise SecretUnavailable("set REPLICATE_WEBHOOK_SECRET (or REPLICATE_API_TOKEN to fetch it)")
    try:
        secret = from_settings(config).default_webhook_secret()
    except ServiceError as exc:
        raise SecretUnavailable(f"could not fetch the webhook secret from Replicate: {exc}") from exc
    check_secret(secret)
    logger.info("fetched the webhook signing secret from Replicate", extra={"action": "webhook_secret"})
    return secret


def check_secret(secret: str) -> None:
    problem = secret_problem(secret)
    if problem:
        raise SecretUnavailable(f"the webhook secret fetched from Replicate {problem}")


# Deliveries that do not become events are counted for the dashboard (service/unrecorded.py),
# off the recording path: refusals here, duplicates after the answer is made (a hook the
# handler adds to a duplicate's request only, so a recorded webhook pays nothing for it).
@bp.errorhandler(BadSignature)
@bp.errorhandler(BadWebhook)
@bp.errorhandler(BodyTooLarge)
@bp.errorhandler(InvalidEvent)
def _refused(exc: ServiceError) -> tuple[dict, int]:
    metrics.WEBHOOKS_REJECTED.labels(exc.code).inc()
    logger.info("webhook refused: %s", exc.message, extra={
        "action": "webhook_refused", "reason": exc.code, "status": exc.status,
        "webhook_id": (request.headers.get("webhook-id") or "")[:256] or None,
        "job_id": _job_param(request.args.get("job")), "remote_addr": request.remote_addr})
    unrecorded.note(exc.code, exc.status, exc.message)
    return {"error": exc.code, "message": exc.message}, exc.status


def _count_duplicate(response: Response) -> Response:
    if response.status_code == 200:
        unrecorded.note("duplicate", 200)
    return response
