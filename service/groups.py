"""Group commit: work that arrives while a group is being committed waits, then goes to
the database with everything else that arrived meanwhile, as one statement in one
transaction. Under load, the webhook endpoint's per-statement and per-commit costs
(the round trip, the statement's start-up, the commit and its WAL flush) are then paid
once per group instead of once per webhook; a webhook that arrives alone is committed
at once, as before. Every caller still returns only after its own item has committed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

# Records the items of a group and returns, for each item in order, its result or the
# exception its caller should raise.
Record = Callable[[Sequence[Any]], Sequence[Any]]


class _Slot:
    __slots__ = ("item", "outcome", "done")

    def __init__(self, item: Any) -> None:
        self.item, self.outcome, self.done = item, None, False


class GroupCommit:
    """`submit(item)` runs `record` on a group holding the item and returns its result.

    No thread of its own (nothing to start, stop, or lose in a fork): the caller that
    finds no group running leads one, with every item waiting (at most `max_size`),
    while callers arriving meanwhile wait for it; when it ends, the first of them to wake
    leads the next group. Each caller raises its own item's exception, in its own thread.
    """

    def __init__(self, record: Record, max_size: int = 32) -> None:
        self._record, self._max_size = record, max_size
        self._changed = threading.Condition()
        self._waiting: list[_Slot] = []
        self._running = False

    @property
    def waiting(self) -> int:
        """Items waiting for a group to take them (not those being recorded)."""
        with self._changed:
            return len(self._waiting)

    def submit(self, item: Any) -> Any:
        slot = _Slot(item)
        with self._changed:
            self._waiting.append(slot)
        while not slot.done:
            group = self._lead_or_wait(slot)
            if group:
                self._run(group)
        if isinstance(slot.outcome, BaseException):
            raise slot.outcome
        return slot.outcome

    def _lead_or_wait(self, slot: _Slot) -> list[_Slot]:
        """The group this caller is to run, or [] once its item is done."""
        with self._changed:
            while self._running and not slot.done:
                self._changed.wait()
            if slot.done:
                return []
            self._running = True
            group, self._waiting = self._waiting[:self._max_size], self._waiting[self._max_size:]
            return group

    def _run(self, group: list[_Slot]) -> None:
        try:
            outcomes = list(self._record([slot.item for slot in group]))
            if len(outcomes) != len(group):
                raise RuntimeError(f"a group of {len(group)} recorded {len(outcomes)} results")
        except BaseException as exc:  # each waiting caller must hear of it, not only this one
            outcomes = [exc] * len(group)
        with self._changed:
            for slot, outcome in zip(group, outcomes, strict=True):
                slot.outcome, slot.done = outcome, True
            self._running = False
            self._changed.notify_all()
