"""The Replicate HTTP client: paced creations, retries that honor Replicate's hints, named errors.

Creations share one limiter per client (Replicate allows 600 a minute, 6 for low-credit
accounts). A 429 waits as long as Replicate asks; 5xx answers, refused connections and
timeouts back off exponentially with jitter; any other 4xx is final. The token is sent
in the Authorization header only and never logged or put into an error message.
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests

from service.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidPredictionRequest,
    ReplicateError,
    ReplicateRateLimited,
    ReplicateRejected,
    ReplicateUnavailable,
)

logger = logging.getLogger(__name__)
# The retry jitter's own generator, not the process's global one (as in service/queue.py).
_jitter = random.Random()

DEFAULT_BASE_URL = "https://api.replicate.com/v1"
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")
# A wait longer than this is not slept through in a request thread: the caller gets
# ReplicateRateLimited(retry_after=...) and can reschedule the work instead.
MAX_HINTED_WAIT = 120.0

_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*")
_PREDICTION_ID = re.compile(r"[A-Za-z0-9_-]+")
_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_RESETS_IN = re.compile(r"resets in ~?\s*(\d+(?:\.\d+)?)\s*s", re.IGNORECASE)
_RATELIMIT_RESET = re.compile(r"\breset=(\d+(?:\.\d+)?)")
_TRANSPORT_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class RateLimiter:
    """Spaces calls 60/rate_per_minute seconds apart, across every thread that shares it."""

    def __init__(self, rate_per_minute: float) -> None:
        if rate_per_minute <= 0:
            raise ConfigError(f"the Replicate rate limit must be positive, got {rate_per_minute}")
        self.interval = 60.0 / rate_per_minute
        self._next = 0.0  # monotonic time of the next free slot
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take the next slot and sleep until it comes; return the seconds waited."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)
        return slot - now

    def hold(self, seconds: float) -> None:
        """Hand out no slot for `seconds`: Replicate said to wait, so every thread waits."""
        with self._lock:
            self._next = max(self._next, time.monotonic() + seconds)


class ReplicateClient:
    """Calls Replicate's HTTP API; safe to share between threads."""

    def __init__(self, base_url: str, token: str | None, *, rate_per_minute: float = 600,
                 timeout: float | tuple[float, float] = (5.0, 30.0), max_retries: int = 5,
                 backoff_base: float = 0.5, backoff_cap: float = 30.0,
                 session: requests.Session | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"the Replicate base URL must be http(s), got {base_url!r}")
        if max_retries < 0:
            raise ConfigError(f"max_retries must not be negative, got {max_retries}")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.limiter = RateLimiter(rate_per_minute)
        self._session = session or requests.Session()

    def __repr__(self) -> str:
        return f"ReplicateClient({self.base_url!r}, interval={self.limiter.interval:.3f}s)"

    def create_prediction(self, *, version: str | None = None, model: str | None = None,
                          deployment: str | None = None, input: Mapping[str, Any],
                          webhook: str | None = None,
                          webhook_events_filter: Iterable[str] = WEBHOOK_EVENTS,
                          deadline: float | None = None) -> dict[str, Any]:
        """Start a prediction from exactly one of a version id, a model or a deployment ("owner/name").
        With a deadline (a time.monotonic() value), each attempt sends the time left then as
        Cancel-After, and none is sent once it has passed (DeadlineExceeded): the pacing
        and retries before an attempt may take a while."""
        path = _creation_path(version, model, deployment)
        body = _creation_body(version, input, webhook, webhook_events_filter)
        return self._call("POST", path, body, paced=True, deadline=deadline)

    def get_prediction(self, prediction_id: str) -> dict[str, Any]:
        return self._call("GET", f"/predictions/{_checked_id(prediction_id)}", prediction_id=prediction_id)

    def cancel_prediction(self, prediction_id: str) -> dict[str, Any]:
        path = f"/predictions/{_checked_id(prediction_id)}/cancel"
        return self._call("POST", path, prediction_id=prediction_id)

    def default_webhook_secret(self) -> str:
        """The signing secret (whsec_...) of the account's webhooks."""
        key = self._call("GET", "/webhooks/default/secret").get("key")
        if not isinstance(key, str) or not key:
            raise ReplicateError(detail="the webhook secret answer has no key")
        return key

    def close(self) -> None:
        self._session.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
              paced: bool = False, prediction_id: str | None = None,
              deadline: float | None = None) -> dict[str, Any]:
        """Send until an answer is final; transient failures are retried max_retries times."""
        attempt = 0
        while True:
            attempt += 1
            if paced:
                self.limiter.acquire()
            headers = {} if deadline is None else {"Cancel-After": cancel_after(deadline - time.monotonic())}
            try:
                return self._attempt(method, path, body, attempt, prediction_id, headers)
            except (ReplicateRateLimited, ReplicateUnavailable) as failure:
                wait = self._wait_after(failure, attempt)
                if attempt > self.max_retries or wait > MAX_HINTED_WAIT:
                    raise
                if paced and getattr(failure, "reached", False):
                    # A creation Replicate may have received is not repeated here: the
                    # caller's retry first looks for the prediction it may have started.
                    raise
                self._pause(wait, shared=paced and isinstance(failure, ReplicateRateLimited))

    def _pause(self, seconds: float, *, shared: bool) -> None:
        """A throttled creation holds the limiter, so the next acquire() and other threads wait too."""
        if shared:
            self.limiter.hold(seconds)
        else:
            time.sleep(seconds)

    def _attempt(self, method: str, path: str, body: dict[str, Any] | None, attempt: int,
                 prediction_id: str | None, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        started = time.monotonic()
        try:
            response = self._session.request(method, self.base_url + path, json=body,
                                             headers={**self._headers(), **(headers or {})},
                                             timeout=self.timeout)
        except _TRANSPORT_ERRORS as exc:
            self._log(method, path, type(exc).__name__, attempt, started, prediction_id)
            reached = not isinstance(exc, requests.ConnectionError) or isinstance(exc, requests.ReadTimeout)
            raise ReplicateUnavailable(detail=f"{type(exc).__name__} on {method} {path}",
                                       reached=reached) from exc
        except requests.RequestException as exc:
            raise ReplicateError(detail=f"{type(exc).__name__} on {method} {path}") from exc
        payload = _json(response)
        if response.ok and isinstance(payload, dict):
            prediction_id = prediction_id or payload.get("id")
        self._log(method, path, response.status_code, attempt, started, prediction_id)
        if not response.ok:
            raise self._failure(response, payload)
        if not isinstance(payload, dict):
            raise ReplicateError(replicate_status=response.status_code, detail="answer is not a JSON object")
        return payload

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "replicate-jobs-service"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _failure(self, response: requests.Response, payload: Any) -> ReplicateError:
        status, detail = response.status_code, self._scrub(_detail(response, payload))
        if status == 429:
            return ReplicateRateLimited(detail=detail, retry_after=_retry_after(response, payload, detail))
        if status >= 500:
            return ReplicateUnavailable(replicate_status=status, detail=detail)
        return ReplicateRejected(replicate_status=status, detail=detail)

    def _wait_after(self, failure: ReplicateError, attempt: int) -> float:
        """Seconds before the next attempt: Replicate's hint (plus a little jitter), else backoff."""
        hinted = getattr(failure, "retry_after", None)
        if hinted is not None:
            return hinted + _jitter.uniform(0, min(0.25, hinted / 10))
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
        return ceiling / 2 + _jitter.uniform(0, ceiling / 2)

    def _scrub(self, text: str) -> str:
        """Replicate's words, minus our token should anything ever echo it."""
        return text.replace(self._token, "[token]") if self._token else text

    def _log(self, method: str, path: str, status: int | str, attempt: int, started: float,
             prediction_id: str | None) -> None:
        ok = isinstance(status, int) and status < 400
        logger.log(logging.INFO if ok else logging.WARNING, "replicate %s %s -> %s", method, path, status,
                   extra={"action": "replicate_request", "method": method, "path": path, "status": status,
                          "attempt": attempt, "elapsed_ms": round((time.monotonic() - started) * 1000),
                          "prediction_id": prediction_id})


def from_settings(config: Mapping[str, Any]) -> ReplicateClient:
    """Build the client from the Flask config (REPLICATE_API_BASE_URL, _TOKEN, _RATE_LIMIT_PER_MINUTE)."""
    base_url = config.get("REPLICATE_API_BASE_URL") or DEFAULT_BASE_URL
    token = config.get("REPLICATE_API_TOKEN") or None
    if token is None and urlsplit(base_url).hostname == "api.replicate.com":
        raise ConfigError("REPLICATE_API_TOKEN is required to call api.replicate.com (or set "
                          "REPLICATE_API_BASE_URL to a local simulator: ./run.sh writes both to "
                          ".flaskenv while it runs)")
    rate = config.get("REPLICATE_RATE_LIMIT_PER_MINUTE") or 600
    return ReplicateClient(base_url, token, rate_per_minute=int(rate))


def cancel_after(seconds: float) -> str:
    """Seconds left as Replicate's Cancel-After duration: whole seconds ("90s"), or
    milliseconds under ten seconds ("2500ms"), rounded down so Replicate stops a prediction
    no later than the job's deadline. DeadlineExceeded when nothing is left."""
    milliseconds = int(seconds * 1000)
    if milliseconds <= 0:
        raise DeadlineExceeded()
    return f"{milliseconds}ms" if milliseconds < 10_000 else f"{milliseconds // 1000}s"


def _creation_path(version: str | None, model: str | None, deployment: str | None) -> str:
    given = [(kind, ref) for kind, ref in (("version", version), ("model", model),
                                           ("deployment", deployment)) if ref is not None]
    if len(given) != 1:
        raise InvalidPredictionRequest("give exactly one of version, model or deployment")
    kind, ref = given[0]
    pattern, shape = (_VERSION, "a version id") if kind == "version" else (_SLUG, '"owner/name"')
    if not isinstance(ref, str) or not pattern.fullmatch(ref):
        raise InvalidPredictionRequest(f"{kind} must be {shape}, got {ref!r}")
    return "/predictions" if kind == "version" else f"/{kind}s/{ref}/predictions"


def _creation_body(version: str | None, input: Mapping[str, Any], webhook: str | None,
                   events: Iterable[str]) -> dict[str, Any]:
    if not isinstance(input, Mapping):
        raise InvalidPredictionRequest("input must be a mapping of the model's input names to values")
    body: dict[str, Any] = {"input": dict(input)}
    if version is not None:
        body["version"] = version
    if webhook is not None:
        body["webhook"] = _checked_webhook(webhook)
        body["webhook_events_filter"] = _checked_events(events)
    return body


def _checked_webhook(webhook: str) -> str:
    parts = urlsplit(webhook) if isinstance(webhook, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidPredictionRequest(f"webhook must be an http(s) URL, got {webhook!r}")
    return webhook


def _checked_events(events: Iterable[str]) -> list[str]:
    chosen = [events] if isinstance(events, str) else list(events)
    unknown = [e for e in chosen if e not in WEBHOOK_EVENTS]
    if isinstance(events, str) or not chosen or unknown:
        raise InvalidPredictionRequest(f"webhook_events_filter must be a non-empty list drawn from "
                                       f"{', '.join(WEBHOOK_EVENTS)}; got {events!r}")
    return list(dict.fromkeys(chosen))


def _checked_id(prediction_id: str) -> str:
    if not isinstance(prediction_id, str) or not _PREDICTION_ID.fullmatch(prediction_id):
        raise InvalidPredictionRequest(f"not a prediction id: {prediction_id!r}")
    return prediction_id


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _detail(response: requests.Response, payload: Any) -> str:
    """Replicate's problem+json `detail` (or `title`), else the start of the body."""
    if isinstance(payload, dict):
        text = payload.get("detail") or payload.get("title")
        if text:
            return str(text)
    return response.text[:300].strip() or response.reason or "no detail"


def _retry_after(response: requests.Response, payload: Any, detail: str) -> float | None:
    """How long Replicate asked us to wait, from the first source that says."""
    body = payload.get("retry_after") if isinstance(payload, dict) else None
    headers = response.headers
    reset = headers.get("RateLimit-Reset") or headers.get("X-RateLimit-Reset")
    for found in (_seconds(body), _header_seconds(headers.get("Retry-After")), _reset_seconds(reset),
                  _match_seconds(_RATELIMIT_RESET, headers.get("RateLimit")),
                  _match_seconds(_RESETS_IN, detail)):
        if found is not None:
            return found
    return None


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float) or (isinstance(value, str) and _SECONDS.fullmatch(value.strip())):
        return max(0.0, float(value))
    return None


def _header_seconds(value: str | None) -> float | None:
    """Retry-After is delta-seconds or an HTTP date."""
    if value is None or _seconds(value) is not None:
        return _seconds(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def _reset_seconds(value: str | None) -> float | None:
    """Rate-limit reset headers hold seconds to wait, or (when huge) a Unix time."""
    seconds = _seconds(value)
    if seconds is not None and seconds > 1e9:
        return max(0.0, seconds - time.time())
    return seconds


def _match_seconds(pattern: re.Pattern[str], text: str | None) -> float | None:
    match = pattern.search(text or "")
    return float(match.group(1)) if match else None
