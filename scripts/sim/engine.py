"""Predictions and their lifecycle: starting -> processing (logs) -> outputs -> a terminal status."""

from __future__ import annotations

import copy
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from . import progress
from .catalog import Request
from .delivery import Deliveries, Message
from .faults import Faults
from .images import output_size, png
from .scheduler import Scheduler
from .wire import dumps, new_prediction_id, new_webhook_id, rfc3339

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
THROTTLED = ("output", "logs")
FAIL_WORD = re.compile(r"\bfail\b", re.IGNORECASE)
PROMPT_ERROR = 'Error generating image: the prompt asked the simulator to fail ("fail")'
FAULT_ERROR = "CUDA error: an illegal memory access was encountered (simulated fault)"


@dataclass(frozen=True)
class Timing:
    """Simulated seconds; the wall clock runs them `speed` times faster."""

    start_delay: float = 1.0          # starting -> processing, a warm model
    step_seconds: float = 1 / 4.9     # one denoising step: SDXL runs about 4.9 it/s
    upload_seconds: float = 0.3       # per output file
    throttle_seconds: float = 0.5     # Replicate: output/logs webhooks at most once per 500 ms


@dataclass
class Run:
    """A prediction's public object and the private state that drives it."""

    obj: dict
    events: tuple[str, ...]
    steps: int
    outputs: int
    rate: float
    seed: int
    fail_at: int | None
    error: str | None
    created_ns: int
    started_ns: int | None = None
    sequence: int = 0
    last_sent: float = float("-inf")
    pending: str | None = None
    flush_due: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Owns every prediction; all state changes happen under one lock."""

    def __init__(self, base_url: str, speed: float, faults: Callable[[], Faults], scheduler: Scheduler,
                 deliveries: Deliveries, seed: int | None, timing: Timing) -> None:
        self.base_url = base_url
        self.speed = speed
        self.timing = timing
        self._faults = faults
        self._scheduler = scheduler
        self._deliveries = deliveries
        self._ids = random.Random(seed)  # prediction ids repeat across runs with the same seed
        self._rng = random.Random(None if seed is None else f"{seed}:runs")
        self._webhook_ids = random.SystemRandom()
        self._lock = threading.RLock()
        self._runs: dict[str, Run] = {}
        self._files: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    # -- reading ---------------------------------------------------------------------------
    def get(self, prediction_id: str) -> dict | None:
        with self._lock:
            run = self._runs.get(prediction_id)
            return copy.deepcopy(run.obj) if run else None

    def all(self) -> dict[str, dict]:
        with self._lock:
            return {pid: copy.deepcopy(run.obj) for pid, run in self._runs.items()}

    def wait(self, prediction_id: str, timeout: float) -> dict | None:
        """Block until the prediction is terminal or timeout (wall seconds) passes."""
        with self._lock:
            run = self._runs.get(prediction_id)
        if run:
            run.done.wait(timeout)
        return self.get(prediction_id)

    def file(self, prediction_id: str, index: int) -> bytes | None:
        """The PNG behind output URL number index, generated on first request."""
        key = (prediction_id, index)
        with self._lock:
            run = self._runs.get(prediction_id)
            if not run or index >= len(run.obj["output"] or []):
                return None
            if key in self._files:
                return self._files[key]
            size, tint = output_size(run.obj["input"]), run.seed + 97 * index
        data = png(*size, tint=tint)  # outside the lock: a big image must not stall predictions
        with self._lock:
            self._files[key] = data
            while len(self._files) > 32:
                self._files.popitem(last=False)
        return data

    # -- commands --------------------------------------------------------------------------
    def create(self, request: Request, deadline: float | None = None) -> dict:
        """Start a prediction; deadline is Cancel-After in simulated seconds."""
        with self._lock:
            run = self._new_run(request)
            self._runs[run.obj["id"]] = run
            self._emit(run, "start")
            self._after(run, self.timing.start_delay, self._begin)
            if deadline is not None:
                self._after(run, deadline, self._deadline)
            return copy.deepcopy(run.obj)

    def cancel(self, prediction_id: str) -> dict | None:
        with self._lock:
            run = self._runs.get(prediction_id)
            if run is None:
                return None
            if run.obj["status"] not in TERMINAL:
                self._finish(run, "canceled")
            return copy.deepcopy(run.obj)

    # -- lifecycle -------------------------------------------------------------------------
    def _new_run(self, request: Request) -> Run:
        pid = new_prediction_id(self._ids)
        while pid in self._runs:
            pid = new_prediction_id(self._ids)
        created = time.time_ns()
        model_input = request.input
        steps = model_input.get("num_inference_steps", request.model.steps)
        fail_at, error = self._failure(pid, model_input, steps)
        obj = _prediction(pid, request, self.base_url, rfc3339(created, 3))
        return Run(obj=obj, events=request.events, steps=steps,
                   outputs=model_input.get("num_outputs", 1),
                   rate=round(self._rng.uniform(0.99, 1.01) / self.timing.step_seconds, 2),
                   seed=model_input.get("seed", self._rng.randrange(100_000)),
                   fail_at=fail_at, error=error, created_ns=created)

    def _failure(self, pid: str, model_input: dict, steps: int) -> tuple[int | None, str | None]:
        if FAIL_WORD.search(str(model_input.get("prompt", ""))):
            return max(1, steps * 2 // 5), PROMPT_ERROR
        faults = self._faults()
        if faults.on("fail") and faults.chance("fail", pid) < faults.fail_rate:
            return max(1, steps // 2), FAULT_ERROR
        return None, None

    def _after(self, run: Run, seconds: float, step: Callable[[Run], None]) -> None:
        def fire() -> None:
            with self._lock:
                if run.obj["status"] not in TERMINAL:
                    step(run)
        self._scheduler.call_later(seconds / self.speed, fire)

    def _begin(self, run: Run) -> None:
        run.started_ns = time.time_ns()
        prompt = str(run.obj["input"].get("prompt", ""))
        run.obj.update(status="processing", started_at=rfc3339(run.started_ns))
        run.obj["logs"] = progress.header(run.seed, prompt) + progress.progress_line(0, run.steps, run.rate)
        self._emit(run, "logs")
        self._after(run, self.timing.step_seconds, lambda r: self._step(r, 1))

    def _step(self, run: Run, done: int) -> None:
        run.obj["logs"] += progress.progress_line(done, run.steps, run.rate)
        if done == run.fail_at:
            run.obj["logs"] += progress.traceback(run.error or "")
            self._finish(run, "failed", run.error)
            return
        self._emit(run, "logs")
        if done < run.steps:
            self._after(run, self.timing.step_seconds, lambda r: self._step(r, done + 1))
        else:
            self._after(run, self.timing.upload_seconds, lambda r: self._output(r, 0))

    def _output(self, run: Run, index: int) -> None:
        url = f"{self.base_url}/files/{run.obj['id']}/{index}.png"
        run.obj["output"] = [*(run.obj["output"] or []), url]
        self._emit(run, "output")
        if index + 1 < run.outputs:
            self._after(run, self.timing.upload_seconds, lambda r: self._output(r, index + 1))
        else:
            self._finish(run, "succeeded")

    def _deadline(self, run: Run) -> None:
        """Cancel-After: aborted if the prediction never started, canceled if it was running."""
        self._finish(run, "aborted" if run.obj["status"] == "starting" else "canceled")

    def _finish(self, run: Run, status: str, error: str | None = None) -> None:
        now = time.time_ns()
        if run.started_ns is None and status != "aborted":
            run.started_ns = now  # canceled before it began: Replicate stamps both together
            run.obj["started_at"] = rfc3339(now)
        metrics: dict[str, float] = {}
        if run.started_ns is not None:
            metrics["predict_time"] = round((now - run.started_ns) / 1e9, 9)
        metrics["total_time"] = round((now - run.created_ns) / 1e9, 9)
        run.obj.update(status=status, error=error, completed_at=rfc3339(now), metrics=metrics)
        run.done.set()
        self._emit(run, "completed")
        if not run.obj.get("webhook") or "completed" not in run.events:
            self._deliveries.release(run.obj["id"])

    # -- webhooks --------------------------------------------------------------------------
    def _emit(self, run: Run, event: str) -> None:
        """Send the event if filtered in; output/logs at most once per throttle window."""
        if not run.obj.get("webhook") or event not in run.events:
            return
        if event not in THROTTLED:
            self._send(run, event)
            return
        interval = self.timing.throttle_seconds / self.speed
        now = time.monotonic()
        if not run.flush_due and now - run.last_sent >= interval:
            run.last_sent = now
            self._send(run, event, now)
            return
        run.pending = "output" if "output" in (event, run.pending) else "logs"
        if not run.flush_due:  # trailing send, so the latest state is not lost
            run.flush_due = True
            self._scheduler.call_later(run.last_sent + interval - now, lambda: self._flush(run))

    def _flush(self, run: Run) -> None:
        with self._lock:
            run.flush_due = False
            event, run.pending = run.pending, None
            if event and run.obj["status"] not in TERMINAL:
                run.last_sent = time.monotonic()
                self._send(run, event, run.last_sent)

    def _send(self, run: Run, event: str, now: float | None = None) -> None:
        run.sequence += 1
        message = Message(new_webhook_id(self._webhook_ids), run.obj["id"], run.sequence, event,
                          run.obj["status"], run.obj["webhook"], dumps(run.obj),
                          time.monotonic() if now is None else now)
        self._deliveries.submit(message)


def _prediction(pid: str, request: Request, base_url: str, created_at: str) -> dict:
    """A new prediction object, fields in the order Replicate's API writes them."""
    get = f"{base_url}/v1/predictions/{pid}"
    obj = {"id": pid, "model": request.model.name, "version": request.version,
           "input": request.input, "logs": "", "output": None, "data_removed": False,
           "error": None, "status": "starting", "created_at": created_at,
           "started_at": None, "completed_at": None,
           "urls": {"cancel": f"{get}/cancel", "get": get, "web": f"{base_url}/p/{pid}"},
           "metrics": {}}
    if request.webhook:
        obj["webhook"] = request.webhook
        obj["webhook_events_filter"] = list(request.events)
    return obj
