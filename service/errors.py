"""The few errors the service raises on purpose; each docstring is its default message."""

from __future__ import annotations

import logging
import re

from flask import Flask, request
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import NotFound as RouteNotFound

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Unexpected service error."""

    code = "service_error"
    status = 500

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(ServiceError):
    """A setting is missing or malformed."""

    code = "config_error"


class MigrationError(ServiceError):
    """A migration could not be applied."""

    code = "migration_error"


class InvalidEvent(ServiceError):
    """The event was refused by the event store."""

    code = "invalid_event"
    status = 400


class NotFound(ServiceError):
    """No such thing."""

    code = "not_found"
    status = 404


class DeadlineExceeded(ServiceError):
    """deadline exceeded"""

    code = "deadline_exceeded"
    status = 409
    transient = False  # the time left only shrinks


class ReplicateError(ServiceError):
    """Replicate could not be used."""

    code = "replicate_error"
    status = 502
    # Whether the same call may succeed if made again later.
    transient = False

    def __init__(self, message: str | None = None, *, replicate_status: int | None = None,
                 detail: str | None = None) -> None:
        self.replicate_status = replicate_status
        self.detail = detail
        default = (self.__doc__ or "").strip().rstrip(".")
        if replicate_status is not None:
            default += f" (HTTP {replicate_status})"
        super().__init__(message or (f"{default}: {detail}" if detail else default + "."))


class InvalidPredictionRequest(ReplicateError):
    """The prediction request is malformed."""

    code = "invalid_prediction_request"
    status = 400


class ReplicateRejected(ReplicateError):
    """Replicate refused the request."""

    code = "replicate_rejected"


class ReplicateUnavailable(ReplicateError):
    """Replicate is unavailable."""

    code = "replicate_unavailable"
    status = 503
    transient = True

    def __init__(self, message: str | None = None, *, replicate_status: int | None = None,
                 detail: str | None = None, reached: bool = True) -> None:
        super().__init__(message, replicate_status=replicate_status, detail=detail)
        # False only when the request certainly never reached Replicate (connection refused),
        # so that repeating a creation cannot start a second prediction.
        self.reached = reached


class ReplicateRateLimited(ReplicateError):
    """Replicate is throttling requests."""

    code = "replicate_rate_limited"
    status = 503
    transient = True

    def __init__(self, message: str | None = None, *, replicate_status: int | None = 429,
                 detail: str | None = None, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message, replicate_status=replicate_status, detail=detail)


def register_handlers(app: Flask) -> None:
    """Every error leaves the service as JSON: {"error": code, "message": text}."""

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError) -> tuple[dict, int]:
        if exc.status >= 500:
            logger.exception("request failed: %s", exc, extra={"action": "error", "code": exc.code})
        return {"error": exc.code, "message": exc.message}, exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[dict, int]:
        code = (exc.name or "error").lower().replace(" ", "_")
        return {"error": code, "message": _described(exc)}, exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[dict, int]:
        logger.exception("unexpected error", extra={"action": "error"})
        return {"error": "internal_error", "message": "the service failed; see its log"}, 500


_JOB_PATH = re.compile(r"^/api/jobs/(?P<id>[^/]+)(/events|/cancel)?$")


def _described(exc: HTTPException) -> str:
    """Werkzeug's text, except for a path under /api that matches no route: say what was
    asked for, in the words the API uses (a job id that is no job is `no job <id>`)."""
    unrouted = isinstance(exc, RouteNotFound) and request.url_rule is None
    if not unrouted or not request.path.startswith("/api"):
        return exc.description or ""
    job = _JOB_PATH.match(request.path)
    if job:
        return f"no job {job['id']}"
    return f"no such endpoint: {request.method} {request.path} (the API: /api/openapi.json)"
