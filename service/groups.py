"""Group commit: work that arrives while a group is being committed waits, then goes to
the database with everything else that arrived meanwhile, as one statement in one
transaction. Under load, the webhook endpoint's per-statement and per-commit costs
(the round trip, the statement's start-up, the commit and its WAL flush) are then paid
once per group instead of once per webhook; a webhook that arrives alone is committed
at once, as before. Every caller still returns only after its own item has committed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# Records the items of a group and returns, for each item in order, its result or the
# exception its caller should raise.
Record = Callable[[Sequence[Any]], Sequence[Any]]


class _Slot:
    __slots__ = ("item", "outcome", "done", "woken", "times")

    def __init__(self, item: Any, times: list[float] | None) -> None:
        self.item, self.outcome, self.done, self.times = item, None, False, times
        self.woken = threading.Lock()  # held until the slot's caller is to go on
        self.woken.acquire()


class GroupCommit:
    """`submit(item)` runs `record` on a group holding the item and returns its result.

    No thread of its own (nothing to start, stop, or lose in a fork): the caller that
    finds no group running leads one; callers arriving meanwhile wait. The leader records
    its item with those waiting (at most `max_size` in all), wakes each of them with its
    outcome, and hands the lead to the longest-waiting caller left, if any. Each waiting
    caller is woken once: with its outcome, or to lead. Each raises its own item's
    exception, in its own thread.

    A caller that passes `times` (a list) gets appended to it, as time.perf_counter
    readings, when its group started recording and when it had recorded: its wait for a
    group, and its group's time in the database.
    """

    def __init__(self, record: Record, max_size: int = 32) -> None:
        self._record, self._max_size = record, max_size
        self._lock = threading.Lock()
        self._waiting: list[_Slot] = []
        self._running = False

    @property
    def waiting(self) -> int:
        """Items waiting for a group to take them (not those being recorded)."""
        with self._lock:
            return len(self._waiting)

    def submit(self, item: Any, times: list[float] | None = None) -> Any:
        slot = _Slot(item, times)
        with self._lock:
            leading = not self._running
            if leading:
                self._running = True
            else:
                self._waiting.append(slot)
        if not leading:
            slot.woken.acquire()  # released by a leader: done, or this caller leads now
        if not slot.done:
            self._lead(slot)
        if isinstance(slot.outcome, BaseException):
            raise slot.outcome
        return slot.outcome

    def _lead(self, slot: _Slot) -> None:
        with self._lock:
            taken = self._max_size - 1
            group, self._waiting = [slot, *self._waiting[:taken]], self._waiting[taken:]
        started = time.perf_counter()
        try:
            outcomes = list(self._record([s.item for s in group]))
            if len(outcomes) != len(group):
                raise RuntimeError(f"a group of {len(group)} recorded {len(outcomes)} results")
        except BaseException as exc:  # each waiting caller must hear of it, not only this one
            outcomes = [exc] * len(group)
        recorded = time.perf_counter()
        for member, outcome in zip(group, outcomes, strict=True):
            member.outcome, member.done = outcome, True
            if member.times is not None:
                member.times += (started, recorded)
            if member is not slot:
                member.woken.release()
        with self._lock:
            following = self._waiting.pop(0) if self._waiting else None
            self._running = following is not None
        if following:
            following.woken.release()
