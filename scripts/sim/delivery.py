"""Webhook deliveries: Standard Webhooks signatures, retries of the completed event, faults."""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .faults import Faults
from .scheduler import Scheduler
from .wire import sign

logger = logging.getLogger(__name__)

# Simulated seconds between attempts of the completed webhook: six attempts, the last one
# about a minute after completion, as Replicate documents. Other events are never retried.
RETRY_DELAYS = (2.0, 4.0, 8.0, 16.0, 32.0)
DUPLICATE_SPREAD = 0.5  # simulated seconds over which duplicate copies follow the original


@dataclass(frozen=True)
class Message:
    """One webhook event: its id is reused by every retry and duplicate of it."""

    webhook_id: str
    prediction_id: str
    sequence: int       # the event's number within its prediction
    event: str          # start | output | logs | completed
    status: str         # the prediction status the body carries
    url: str
    body: str
    emitted_at: float   # time.monotonic() when the prediction produced the event


@dataclass(frozen=True)
class Attempt:
    """One entry of the webhook log: a delivery attempt, or a webhook the drop fault ate."""

    webhook_id: str
    prediction_id: str
    event: str
    status: str
    attempt: int                # 1 = first try, 2.. = retries of the completed webhook
    copy: int                   # 0 = the delivery itself, 1.. = extra copies (duplicate fault)
    response_code: int | None   # None: dropped, or no HTTP answer (see error)
    error: str | None
    dropped: bool
    emitted_at: float
    sent_at: float


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Replicate does not follow redirects when it sends webhooks."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int | None, str | None]:
    """POST and return (status code, error); the code is None when no HTTP answer came."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read()
            return response.status, None
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


class Deliveries:
    """Sends each message on a worker pool at the time the scheduler says, applying faults."""

    def __init__(self, secret: str, speed: float, faults: Callable[[], Faults], scheduler: Scheduler,
                 timeout: float = 5.0, workers: int = 8) -> None:
        self.secret = secret
        self._speed = speed
        self._faults = faults
        self._scheduler = scheduler
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="sim-webhook")
        self._lock = threading.Lock()
        self._log: list[Attempt] = []
        self._held: dict[str, list[Message]] = {}
        self._closed = False

    @property
    def log(self) -> list[Attempt]:
        with self._lock:
            return list(self._log)

    def submit(self, message: Message) -> None:
        faults = self._faults()
        key = (message.prediction_id, message.sequence)
        if faults.on("drop") and faults.chance("drop", *key) < faults.drop_rate:
            self._record(message, 1, 0, None, None, dropped=True)
            logger.info("webhook dropped (fault) %s %s %s", message.event, message.prediction_id,
                        message.webhook_id, extra={"action": "sim_webhook_drop"})
            if message.event == "completed":
                self.release(message.prediction_id)
            return
        if faults.on("reorder") and message.event == "start":
            with self._lock:  # held back until the prediction's completed webhook has gone out
                self._held.setdefault(message.prediction_id, []).append(message)
            return
        delay = 0.0
        if faults.on("reorder") and message.event != "completed":
            delay = faults.chance("reorder", *key) * faults.reorder_window
        self._dispatch(message, faults, delay)

    def release(self, prediction_id: str) -> None:
        """Send the start webhooks the reorder fault held back for this prediction."""
        with self._lock:
            held = self._held.pop(prediction_id, [])
        for message in held:
            self._dispatch(message, self._faults(), 0.0)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _schedule(self, message: Message, attempt: int, copy: int, delay: float) -> None:
        def send() -> None:
            if not self._closed:
                self._pool.submit(self._attempt, message, attempt, copy)
        self._scheduler.call_later(delay / self._speed, send)

    def _dispatch(self, message: Message, faults: Faults, delay: float) -> None:
        """Schedule the delivery, plus one or two extra copies under the duplicate fault."""
        self._schedule(message, 1, 0, delay)
        if faults.on("duplicate"):
            key = (message.prediction_id, message.sequence)
            for copy in range(1, 2 + (faults.chance("copies", *key) < 0.5)):
                spread = faults.chance("spread", *key, copy) * DUPLICATE_SPREAD
                self._schedule(message, 1, copy, delay + spread)

    def _attempt(self, message: Message, attempt: int, copy: int) -> None:
        if self._closed:
            return
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": "replicate-sim/1.0",
                   "webhook-id": message.webhook_id, "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(self.secret, message.webhook_id, timestamp, message.body)}
        code, error = post(message.url, message.body.encode(), headers, self._timeout)
        self._record(message, attempt, copy, code, error)
        logger.info("webhook %s %s %s attempt %d%s -> %s", message.event, message.status,
                    message.prediction_id, attempt, f" copy {copy}" if copy else "", code or error,
                    extra={"action": "sim_webhook", "webhook_id": message.webhook_id})
        if message.event == "completed" and copy == 0:
            if attempt == 1:
                self.release(message.prediction_id)
            failed = code is None or not 200 <= code < 300
            if failed and attempt <= len(RETRY_DELAYS):
                self._schedule(message, attempt + 1, 0, RETRY_DELAYS[attempt - 1])

    def _record(self, message: Message, attempt: int, copy: int, code: int | None,
                error: str | None, dropped: bool = False) -> None:
        entry = Attempt(message.webhook_id, message.prediction_id, message.event, message.status,
                        attempt, copy, code, error, dropped, message.emitted_at, time.monotonic())
        with self._lock:
            self._log.append(entry)
