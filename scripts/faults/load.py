"""Steady load for a fault run: jobs created through the API at a fixed rate, so the
simulator keeps a steady stream of signed webhooks coming (start, a logs webhook every
half simulated second, output, completed, with its faults on top)."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import requests

# (weight, job body): SDXL at 3:4 (about 23 webhooks a prediction), FLUX schnell at 9:16,
# and prompts that make the simulator fail the prediction.
MIX = [
    (7, {"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse at dusk", "aspect_ratio": "3:4"}}),
    (2, {"model": "black-forest-labs/flux-schnell", "input": {"prompt": "a red bicycle"},
         "aspect_ratio": "9:16"}),
    (1, {"model": "stability-ai/sdxl", "input": {"prompt": "please fail", "aspect_ratio": "3:4"}}),
]


class JobLoad:
    """Creates jobs at `rate` per second on a thread until stopped; remembers each answer."""

    def __init__(self, base_url: str, rate: float, seed: int, max_count: int = 2) -> None:
        self.base_url, self.rate, self.max_count = base_url, rate, max_count
        self.rng = random.Random(seed)
        self.created: list[str] = []          # job ids answered 201
        self.answers: Counter = Counter()     # HTTP status (or exception name) of each request
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-load", daemon=True)
        self._session = requests.Session()

    def start(self) -> JobLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        interval, due = 1.0 / self.rate, time.monotonic()
        while not self._stop.is_set():
            self._create_one()
            due += interval
            self._stop.wait(max(0.0, due - time.monotonic()))

    def _create_one(self) -> None:
        body = dict(self.rng.choices([b for _, b in MIX], weights=[w for w, _ in MIX])[0])
        body["count"] = self.rng.randint(1, self.max_count)
        try:
            response = self._session.post(f"{self.base_url}/api/jobs", json=body, timeout=10)
        except requests.RequestException as exc:
            self.answers[type(exc).__name__] += 1
            return
        self.answers[response.status_code] += 1
        if response.status_code == 201:
            self.created.append(response.json()["id"])
