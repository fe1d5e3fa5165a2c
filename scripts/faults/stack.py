"""The real stack for a fault run, as separate processes: gunicorn serving wsgi:app, worker
processes (`flask --app service worker`), the local Replicate simulator (in this process, so
its webhook log says which deliveries got a 2xx), on a PostgreSQL of the run's own.

Each fault is a method: kill -9 a gunicorn worker, kill -9 a worker process while it holds a
task, crash and restart PostgreSQL. Everything started is stopped on the way out, whatever
happened.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from scripts.faults.postgres import private_postgres
from scripts.replicate_sim import start_simulator
from service import db, migrations
from service.config import ROOT
from service.queue import KINDS

sys.path.insert(0, str(ROOT / "scripts" / "bench"))
import ingest  # noqa: E402  (scripts/bench/ingest.py: gunicorn on a free port, stopped by pid)

logger = logging.getLogger(__name__)


@dataclass
class StackOptions:
    speed: float = 10.0                 # simulator time compression
    sim_faults: str = "duplicate,reorder,drop"
    drop_rate: float = 0.05             # share of webhooks the simulator never sends
    workers: int = 2                    # worker processes
    web_workers: int = 2                # gunicorn workers
    lease_seconds: int = 3              # WORKER_LEASE_SECONDS: a killed worker's task waits this long
    reconcile_after: int = 3            # RECONCILE_AFTER_SECONDS
    reconcile_every: int = 2            # RECONCILE_INTERVAL_SECONDS
    seed: int = 7


@dataclass
class Fault:
    kind: str
    at: float                           # seconds since the stack started
    detail: dict = field(default_factory=dict)


class FaultStack:
    def __init__(self, options: StackOptions, tmp: Path, database_url: str, pg, sim) -> None:
        self.options, self.tmp, self.url, self.pg, self.sim = options, tmp, database_url, pg, sim
        self.workers: list[subprocess.Popen] = []
        self.faults: list[Fault] = []
        self.started = time.monotonic()
        self.base_url = ""
        self.web_master = 0
        self.rng = random.Random(options.seed)

    @property
    def storage_dir(self) -> Path:
        return self.tmp / "files"

    def env(self) -> dict[str, str]:
        o = self.options
        return {**os.environ, "DATABASE_URL": self.url, "REPLICATE_API_BASE_URL": self.sim.api_url,
                "REPLICATE_API_TOKEN": "fault-run", "REPLICATE_WEBHOOK_SECRET": self.sim.secret,
                "PUBLIC_BASE_URL": self.base_url, "OUTPUT_ALLOWED_HOSTS": "127.0.0.1",
                "STORAGE_DIR": str(self.storage_dir), "WORKER_LEASE_SECONDS": str(o.lease_seconds),
                "WORKER_POLL_SECONDS": "1", "RECONCILE_AFTER_SECONDS": str(o.reconcile_after),
                "RECONCILE_INTERVAL_SECONDS": str(o.reconcile_every), "WEB_CONCURRENCY": str(o.web_workers),
                "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", "FLASK_SKIP_DOTENV": "1",
                "SUPABASE_URL": "", "SUPABASE_SERVICE_ROLE_KEY": "", "SUPABASE_ANON_KEY": ""}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # -- processes ----------------------------------------------------------------------------
    def start_worker(self) -> subprocess.Popen:
        with (self.tmp / f"worker-{len(self.workers)}.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "flask", "--app", "service", "worker"], cwd=ROOT,
                                    env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(proc)
        return proc

    def live_workers(self) -> list[subprocess.Popen]:
        return [proc for proc in self.workers if proc.poll() is None]

    def stop_workers(self) -> None:
        for proc in self.live_workers():
            proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def web_children(self) -> list[int]:
        """The gunicorn master's worker processes."""
        children = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                except OSError:
                    continue
                if stat[stat.rindex(")") + 2:].split()[1] == str(self.web_master):
                    children.append(int(entry.name))
        return children

    # -- faults -------------------------------------------------------------------------------
    def kill_web_worker(self) -> Fault:
        """kill -9 one gunicorn worker; its master starts another."""
        before = self.web_children()
        victim = self.rng.choice(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(set(self.web_children()) - {victim}) < len(before):
            time.sleep(0.1)
        respawned = len(set(self.web_children()) - {victim}) >= len(before)
        return self._note("kill -9 gunicorn worker", pid=victim, respawned=respawned)

    def kill_worker_mid_task(self, wait: float = 20.0) -> Fault:
        """kill -9 a worker process while it holds a task (a process_output one if it can be
        caught), then start a new worker as a supervisor would."""
        victim, task = self._worker_holding_task(wait)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        self.start_worker()
        return self._note("kill -9 worker mid-task", pid=victim.pid, task_id=task["id"] if task else None,
                          task_kind=task["kind"] if task else None)

    def _worker_holding_task(self, wait: float) -> tuple[subprocess.Popen, dict | None]:
        deadline = time.monotonic() + wait
        with db.connect(self.url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                for kinds in (["process_output"], list(KINDS)):
                    for proc in self.live_workers():
                        task = conn.execute(
                            "SELECT id, kind FROM tasks WHERE status = 'running' AND kind = ANY(%s) "
                            "AND locked_by LIKE %s LIMIT 1", (kinds, f"%:{proc.pid}:%")).fetchone()
                        if task:
                            return proc, task
                    if time.monotonic() < deadline - wait / 2:
                        break  # a process_output task is worth waiting for in the first half
                time.sleep(0.01)
        return self.live_workers()[0], None

    def restart_postgres(self) -> Fault:
        down = self.pg.restart("immediate")
        return self._note("PostgreSQL crash and restart", unreachable_seconds=round(down, 2))

    def _note(self, kind: str, **detail: object) -> Fault:
        fault = Fault(kind, round(self.elapsed(), 1), detail)
        self.faults.append(fault)
        logger.info("fault: %s %s", kind, detail, extra={"action": "fault"})
        return fault


@contextmanager
def fault_stack(options: StackOptions, tmp: Path) -> Iterator[FaultStack]:
    """Start everything (private PostgreSQL, migrated database, simulator, gunicorn, workers);
    stop all of it afterwards, whatever happens."""
    with ExitStack() as stack:
        pg = stack.enter_context(private_postgres())
        url = _database(pg.url)
        sim = start_simulator(speed=options.speed, seed=options.seed, faults={
            "faults": [f for f in options.sim_faults.split(",") if f], "drop_rate": options.drop_rate})
        stack.callback(sim.stop)
        fs = FaultStack(options, tmp, url, pg, sim)
        port, fs.web_master = stack.enter_context(
            ingest.gunicorn("wsgi:app", fs.env(), tmp / "gunicorn.log", quiet=True))
        fs.base_url = f"http://127.0.0.1:{port}"  # the workers' webhook URLs point here
        stack.callback(fs.stop_workers)
        for _ in range(options.workers):
            fs.start_worker()
        fs.started = time.monotonic()
        yield fs


def _database(server_url: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute("CREATE DATABASE faults")
    url = server_url.replace("/postgres?", "/faults?", 1)
    with db.connect(url, autocommit=True) as conn:
        migrations.migrate(conn)
    return url
