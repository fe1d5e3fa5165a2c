"""One timer thread that runs every scheduled step of every prediction and delivery."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Scheduler:
    """call_later(seconds, fn) on a single thread; callbacks must be quick (no network I/O)."""

    def __init__(self) -> None:
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="sim-scheduler", daemon=True)
        self._thread.start()

    def call_later(self, seconds: float, callback: Callable[[], None]) -> None:
        with self._wake:
            if not self._running:
                return
            due = time.monotonic() + max(0.0, seconds)
            heapq.heappush(self._queue, (due, next(self._order), callback))
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._queue.clear()
            self._wake.notify()
        self._thread.join(timeout=5)

    def _next(self) -> Callable[[], None] | None:
        with self._wake:
            while self._running:
                now = time.monotonic()
                if self._queue and self._queue[0][0] <= now:
                    return heapq.heappop(self._queue)[2]
                self._wake.wait(self._queue[0][0] - now if self._queue else None)
            return None

    def _run(self) -> None:
        while (callback := self._next()) is not None:
            try:
                callback()
            except Exception:  # one bad step must not stop every other prediction
                logger.exception("scheduled step failed", extra={"action": "sim_schedule"})
