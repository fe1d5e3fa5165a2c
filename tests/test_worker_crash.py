"""Real worker processes (`flask --app service worker`) killed and stopped: a worker killed with
SIGKILL mid-download loses nothing and records nothing twice; SIGTERM stops an idle one cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from service.config import ROOT
from tests.origin import Origin, Reply, decoded, picture, png, succeeded
from tests.waiting import wait_for


class Workers:
    """Starts worker processes, each logging to its own file; kills whatever is left at the end."""

    def __init__(self, db_url: str, tmp: Path) -> None:
        self.tmp, self.procs = tmp, []
        self.env = {**os.environ, "DATABASE_URL": db_url, "WORKER_LEASE_SECONDS": "3",
                    "WORKER_POLL_SECONDS": "1", "OUTPUT_ALLOWED_HOSTS": "127.0.0.1",
                    "STORAGE_DIR": str(tmp / "files"), "REPLICATE_API_BASE_URL": "http://127.0.0.1:9/v1",
                    "REPLICATE_API_TOKEN": "x", "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
                    # never a developer's .env or Supabase: files stay in the temp dir
                    "FLASK_SKIP_DOTENV": "1", "SUPABASE_URL": "", "SUPABASE_SERVICE_ROLE_KEY": ""}

    def start(self) -> subprocess.Popen:
        log = (self.tmp / f"worker-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "flask", "--app", "service", "worker"], cwd=ROOT,
                                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return (self.tmp / f"worker-{self.procs.index(proc)}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def workers(db_url: str, tmp_path: Path) -> Iterator[Workers]:
    started = Workers(db_url, tmp_path)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


def test_a_worker_killed_mid_download_loses_nothing_and_records_once(workers, origin, conn, tmp_path):
    image = png(picture(512, 512))
    url = origin.serve("/out-0.png", Reply(image, stall=True), image)
    job_id, prediction_id = succeeded(conn, [url])

    first = workers.start()
    assert origin.stalled.wait(15), workers.log(first)  # the worker is half way through the body
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    origin.release.set()
    task = conn.execute("SELECT status, attempts FROM tasks WHERE kind = 'process_output'").fetchone()
    assert (task["status"], task["attempts"]) == ("running", 1)  # claimed by a process that is gone

    second = workers.start()
    def status() -> str:
        return conn.execute("SELECT status FROM jobs WHERE id = %s", (job_id,)).fetchone()["status"]

    wait_for("the job to settle", lambda: status() != "processing", 20)
    assert status() == "completed", workers.log(second)

    events = conn.execute("SELECT data, metadata FROM events WHERE type = 'output.processed'").fetchall()
    assert len(events) == 1, workers.log(second)
    data = events[0]["data"]
    assert (data["prediction_id"], data["index"], events[0]["metadata"]["attempt"]) == (prediction_id, 0, 2)
    task = conn.execute("SELECT status, attempts FROM tasks WHERE kind = 'process_output'").fetchone()
    assert (task["status"], task["attempts"]) == ("done", 2)
    assert origin.requests_for("/out-0.png") == 2
    files = tmp_path / "files"
    processed = (files / urlsplit(data["url"]).path.removeprefix("/files/")).read_bytes()
    assert decoded(processed).shape == (1024, 1024, 3) and len(processed) == data["bytes"]
    assert (files / urlsplit(data["original_url"]).path.removeprefix("/files/")).read_bytes() == image
    assert not list(files.rglob(".*.tmp"))  # the killed worker had written nothing half way


def test_sigterm_stops_an_idle_worker_cleanly(workers):
    proc = workers.start()
    wait_for("the worker to start", lambda: "worker started" in workers.log(proc), 15)
    time.sleep(0.5)  # idle: waiting for a task
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0, workers.log(proc)
    assert time.monotonic() - started < 5
    assert "worker stopped" in workers.log(proc)
