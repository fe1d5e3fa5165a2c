"""Fault switches (duplicate, reorder, drop, fail, ratelimit) and the creation rate limiter."""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace

# Unseeded choices draw from a generator of their own: the simulator runs in a thread beside
# the tests, whose Hypothesis draws check that nothing touches the global one meanwhile.
_unseeded = random.Random()

FAULT_NAMES = ("duplicate", "reorder", "drop", "fail", "ratelimit")


@dataclass(frozen=True)
class Faults:
    """Which faults are on, and their knobs. Immutable: set_faults swaps the whole value."""

    enabled: frozenset[str] = field(default_factory=frozenset)
    seed: int | None = None          # makes drop/fail/duplicate/reorder choices repeatable
    drop_rate: float = 0.3           # share of webhooks never sent (any event, start and completed too)
    fail_rate: float = 0.3           # share of predictions that fail
    reorder_window: float = 2.0      # simulated seconds of random delay on intermediate webhooks
    rate_limit: int = 3              # creations allowed per rate_window while "ratelimit" is on
    rate_window: float = 1.0         # wall-clock seconds
    rate_limit_per_minute: int = 600  # Replicate's documented creation limit, always enforced

    def on(self, name: str) -> bool:
        return name in self.enabled

    def chance(self, *key: object) -> float:
        """A number in [0, 1): a pure function of (seed, key) when seeded, else random."""
        if self.seed is None:
            return _unseeded.random()
        digest = hashlib.sha256(":".join(map(str, (self.seed, *key))).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["enabled"] = sorted(self.enabled)
        return data

    @classmethod
    def parse(cls, spec: object, base: Faults | None = None) -> Faults:
        """Faults from a Faults, 'a,b' text, a list of names, or a dict of names and knobs."""
        base = base or cls()
        if spec is None:
            return base
        if isinstance(spec, Faults):
            return spec
        if isinstance(spec, str):
            return replace(base, enabled=_names(spec.split(",")))
        if isinstance(spec, Mapping):
            return _from_mapping(spec, base)
        if isinstance(spec, Iterable):
            return replace(base, enabled=_names(spec))
        raise ValueError(f"faults must be names or a JSON object, got {type(spec).__name__}")


KNOBS = frozenset(f.name for f in fields(Faults) if f.name != "enabled")


def _names(items: Iterable[object]) -> frozenset[str]:
    names = {str(item).strip().lower() for item in items if str(item).strip()}
    unknown = names - set(FAULT_NAMES)
    if unknown:
        raise ValueError(f"unknown fault {sorted(unknown)[0]!r}; known: {', '.join(FAULT_NAMES)}")
    return frozenset(names)


def _knob(name: str, value: object) -> float | int | None:
    if name == "seed":
        if value is not None and not isinstance(value, int):
            raise ValueError("seed must be a whole number or null")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a non-negative number")
    if name.endswith("_rate") and value > 1:
        raise ValueError(f"{name} must be between 0 and 1")
    if name.startswith("rate_limit"):
        if value != int(value) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1")
        return int(value)
    return float(value)


def _from_mapping(spec: Mapping, base: Faults) -> Faults:
    """{"faults": [...]} replaces the set; {"drop": true} toggles one; other keys are knobs."""
    enabled = set(base.enabled)
    if "faults" in spec:
        listed = spec["faults"]
        enabled = set(_names(listed.split(",") if isinstance(listed, str) else listed))
    changes: dict[str, object] = {}
    for key, value in spec.items():
        if key == "faults":
            continue
        if key in FAULT_NAMES:
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false")
            (enabled.add if value else enabled.discard)(key)
        elif key in KNOBS:
            changes[key] = _knob(key, value)
        else:
            raise ValueError(f"unknown fault setting {key!r}")
    return replace(base, enabled=frozenset(enabled), **changes)


class CreationLimiter:
    """Sliding-window limit on prediction creations, answered as Replicate's 429."""

    def __init__(self) -> None:
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def admit(self, faults: Faults, now: float | None = None) -> int | None:
        """Record a creation and return None, or return retry_after seconds when throttled."""
        now = time.monotonic() if now is None else now
        limits = [(faults.rate_limit_per_minute, 60.0)]
        if faults.on("ratelimit"):
            limits.append((faults.rate_limit, faults.rate_window))
        with self._lock:
            horizon = max(window for _, window in limits)
            while self._times and self._times[0] <= now - horizon:
                self._times.popleft()
            waits = [self._wait(limit, window, now) for limit, window in limits]
            throttled = [wait for wait in waits if wait is not None]
            if throttled:
                return max(throttled)
            self._times.append(now)
            return None

    def _wait(self, limit: int, window: float, now: float) -> int | None:
        recent = [t for t in self._times if t > now - window]
        if len(recent) < limit:
            return None
        return max(1, math.ceil(recent[-limit] + window - now))
