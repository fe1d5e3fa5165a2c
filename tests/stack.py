"""The whole service over real HTTP for end-to-end tests: the local Replicate simulator,
the Flask app served on a real port, and a worker thread with the reconciler."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
from werkzeug.serving import make_server

from scripts.replicate_sim import start_simulator
from service import create_app
from service.cli import handlers, worker_context
from service.reconciler import reconcile
from service.worker import Context, Worker

TERMINAL = {"completed", "failed", "canceled"}


class Stack:
    def __init__(self, app, base_url: str, sim, ctx: Context) -> None:
        self.app, self.base_url, self.sim, self.ctx = app, base_url, sim, ctx
        self._stop = threading.Event()
        self._working: threading.Thread | None = None

    def start_worker(self) -> None:
        """The worker in a thread, with the reconciler, until stop_worker (or the end)."""
        if self._working is None:
            self._stop.clear()
            background = Worker(self.ctx, handlers(), poll_seconds=0.2, periodic=lambda: reconcile(self.ctx),
                                periodic_every=0.5)
            self._working = threading.Thread(target=background.run_forever, args=(self._stop,), daemon=True)
            self._working.start()

    def stop_worker(self) -> None:
        if self._working is not None:
            self._stop.set()
            self._working.join(timeout=10)
            self._working = None

    @contextmanager
    def held(self) -> Iterator[None]:
        """No task runs inside (a job created there stays pending): the worker waits, then
        goes on. For a test that must see a job from its start, whatever the machine's load."""
        running = self._working is not None
        self.stop_worker()
        try:
            yield
        finally:
            if running:
                self.start_worker()

    def create_job(self, **body: Any) -> dict:
        response = requests.post(f"{self.base_url}/api/jobs", json=body, timeout=10)
        assert response.status_code == 201, response.text
        return response.json()

    def job(self, job_id: str) -> dict:
        response = requests.get(f"{self.base_url}/api/jobs/{job_id}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def work(self) -> int:
        """Run the tasks that are ready now, as `flask --app service worker --once`; how many."""
        worker, n = Worker(self.ctx, handlers(), poll_seconds=0.1), 0
        while worker.run_once():
            n += 1
        return n

    def wait(self, job_id: str, statuses: set[str], seconds: float = 30.0) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} stayed {job['status']}, wanted {statuses}: {job}")


@contextmanager
def running_stack(db_url: str, *, speed: float = 20.0, faults: object = None,
                  reconcile_after: int = 300, timing: Any = None, worker: bool = True,
                  **config: Any) -> Iterator[Stack]:
    """The stack; worker=False leaves running tasks to the test (Stack.work)."""
    sim = start_simulator(speed=speed, faults=faults, **({"timing": timing} if timing else {}))
    app = create_app({"TESTING": True, "DATABASE_URL": db_url,
                      "REPLICATE_API_BASE_URL": sim.api_url, "REPLICATE_API_TOKEN": "test-token",
                      "REPLICATE_WEBHOOK_SECRET": None, "RECONCILE_AFTER_SECONDS": reconcile_after,
                      "OUTPUT_ALLOWED_HOSTS": "127.0.0.1", **config})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    base_url = f"http://127.0.0.1:{server.server_port}"
    app.config["PUBLIC_BASE_URL"] = base_url
    served = threading.Thread(target=server.serve_forever, daemon=True)
    served.start()
    stack = Stack(app, base_url, sim, worker_context(app))
    if worker:
        stack.start_worker()
    try:
        yield stack
    finally:
        stack.stop_worker()
        server.shutdown()
        sim.stop()
        app.extensions["db_pool"].close()
