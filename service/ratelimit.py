"""A rate limit on the public endpoints (/webhooks, /api): a token bucket per client
address, in process memory. Each gunicorn worker keeps its own buckets, so the limit a
client meets is per process: with N workers it may get up to N times the burst. The
check is a dict lookup and some arithmetic under a lock: no IO on the webhook path.

Replicate retries a delivery answered 429, so a limit never loses a webhook; the
default (12,000 a minute sustained, bursts of 2,000 per address) is far above what one
account's webhooks need (prediction creation is capped at 600 a minute).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable

from flask import Blueprint, Flask, request

from service import metrics
from service.errors import ServiceError

logger = logging.getLogger(__name__)

# Beyond this many addresses, idle ones are forgotten (a full bucket needs no memory).
MAX_ADDRESSES = 100_000


class RateLimited(ServiceError):
    """Too many requests from this address."""

    code = "rate_limited"
    status = 429

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(f"too many requests from this address; retry after {self.retry_after} s")


class TokenBuckets:
    """Per key: up to `burst` tokens, refilled at `per_minute` / 60 a second; a request takes one."""

    def __init__(self, per_minute: int, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = per_minute / 60.0, float(burst), clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return (1 - tokens) / self.rate
            if len(self._buckets) >= MAX_ADDRESSES and key not in self._buckets:
                self._forget_idle(now)
            self._buckets[key] = (tokens - 1, now)
            return 0.0

    def _forget_idle(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
        if len(self._buckets) >= MAX_ADDRESSES:  # all busy: start over rather than grow
            self._buckets.clear()


def limit_blueprints(app: Flask, blueprints: Iterable[Blueprint]) -> None:
    """Check the limit before every request of these blueprints (nothing when it is 0)."""
    per_minute = app.config["RATE_LIMIT_PER_MINUTE"]
    if not per_minute:
        return
    buckets = app.extensions["rate_limit"] = TokenBuckets(per_minute, app.config["RATE_LIMIT_BURST"])
    check = checker(buckets, frozenset(app.config["RATE_LIMIT_EXEMPT"]))
    for bp in blueprints:
        app.before_request_funcs.setdefault(bp.name, []).insert(0, check)
    app.register_error_handler(RateLimited, _too_many)


def checker(buckets: TokenBuckets, exempt: frozenset[str]) -> Callable[[], None]:
    """The before-request check, holding the buckets and exempt addresses it was made with:
    settings are read once, in the factory, not on every request. A plain function, as
    Flask asks of every hook on every request whether it is a coroutine function."""

    def check() -> None:
        address = request.remote_addr or ""
        if address in exempt:
            return
        wait = buckets.take(address)
        if wait:
            metrics.rate_limited(request.blueprint or "")
            raise RateLimited(wait)

    return check


def _too_many(exc: RateLimited) -> tuple[dict, int, dict]:
    # Logged at most as a warning per refusal would let a flood fill the log: debug only.
    logger.debug("rate limited", extra={"action": "rate_limit", "remote_addr": request.remote_addr})
    return ({"error": exc.code, "message": exc.message, "retry_after": exc.retry_after}, exc.status,
            {"Retry-After": str(exc.retry_after)})
