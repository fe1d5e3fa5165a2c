"""Fault run: the real stack under steady webhook load while processes are killed and the
database crashes; then count that nothing acknowledged was lost, every job ended, nothing
was processed twice, and the projections equal a replay.

    .venv/bin/python scripts/faults/run.py [--duration 300] [--rate 1] [--fault-every 20]

Starts its own PostgreSQL (pgserver's binaries, a temp dir, a Unix socket: never the shared
server, never DATABASE_URL), gunicorn (gunicorn.conf.py, wsgi:app), --workers worker
processes and the local Replicate simulator (duplicate, reorder and drop faults on). Jobs are
created through the API at --rate per second for --duration seconds; every --fault-every
seconds the next fault in turn: kill -9 a gunicorn worker, kill -9 a worker process while it
holds a task (a new one is started, as a supervisor would), crash PostgreSQL (pg_ctl -m
immediate) and start it again. Then it waits up to --drain seconds for everything to settle,
checks, prints the counts, and exits 1 if any check failed. Everything it started is stopped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.faults.checks import TERMINAL, Counts, check  # noqa: E402
from scripts.faults.load import JobLoad  # noqa: E402
from scripts.faults.stack import Fault, FaultStack, StackOptions, fault_stack  # noqa: E402
from service import db  # noqa: E402

FAULTS = ("kill_web_worker", "kill_worker_mid_task", "restart_postgres")


@dataclass
class Result:
    counts: Counts
    faults: list[Fault]
    load_seconds: float
    settle_seconds: float
    settled: bool
    acks_during_load: int          # 2xx webhook answers while jobs were being created
    recovered: list[bool]          # per fault: a 2xx webhook answer came after it
    killed_tasks: dict[int, tuple[str, int]]   # task id -> (status, attempts) afterwards

    @property
    def ok(self) -> bool:
        rerun = all(status == "done" and attempts >= 2 for status, attempts in self.killed_tasks.values())
        return self.counts.ok and self.settled and all(self.recovered) and rerun


def run_suite(tmp: Path, *, duration: float, rate: float, fault_every: float, drain: float,
              options: StackOptions, say: Callable[[str], None] = print) -> Result:
    with fault_stack(options, tmp) as fs:
        say(f"stack up: gunicorn {fs.base_url}, {options.workers} workers, simulator {fs.sim.api_url} "
            f"(speed {options.speed:g}, faults {options.sim_faults}, drop rate {options.drop_rate})")
        load = JobLoad(fs.base_url, rate, options.seed).start()
        try:
            _inject(fs, duration, fault_every, say)
        finally:
            load.stop()
        load_seconds = fs.elapsed()
        say(f"load stopped after {load_seconds:.0f} s: {len(load.created)} jobs created; settling")
        settled, settle_seconds = _settle(fs, drain)
        counts = check(fs.url, fs.sim, load.created, fs.storage_dir)
        counts.deliveries.update({f"job create {k}": v for k, v in load.answers.items()})
        log = fs.sim.webhook_log
        acks = [a.sent_at - fs.started for a in log if a.response_code and 200 <= a.response_code < 300]
        return Result(counts, fs.faults, load_seconds, settle_seconds, settled,
                      sum(1 for t in acks if t <= load_seconds),
                      [any(t > f.at + 0.5 for t in acks) for f in fs.faults], _killed_tasks(fs))


def _inject(fs: FaultStack, duration: float, fault_every: float, say: Callable[[str], None]) -> None:
    n = 0
    while True:
        due = (n + 1) * fault_every
        if due > duration:
            break
        time.sleep(max(0.0, due - fs.elapsed()))
        fault = getattr(fs, FAULTS[n % len(FAULTS)])()
        say(f"  t={fault.at:6.1f}s  {fault.kind}: {fault.detail}")
        n += 1
    time.sleep(max(0.0, duration - fs.elapsed()))


def _settle(fs: FaultStack, drain: float) -> tuple[bool, float]:
    """Wait until every job is terminal, no task is pending, the simulator has finished every
    prediction and its webhook log has been still for 3 s; False if drain ran out first."""
    started = time.monotonic()
    last, still_since = -1, time.monotonic()
    with db.connect(fs.url, autocommit=True) as conn:
        while time.monotonic() - started < drain:
            n = len(fs.sim.webhook_log)
            if n != last:
                last, still_since = n, time.monotonic()
            busy = conn.execute(
                "SELECT (SELECT count(*) FROM jobs WHERE NOT status = ANY(%s))"
                " + (SELECT count(*) FROM tasks WHERE status IN ('queued', 'running')) AS n",
                (list(TERMINAL),)).fetchone()["n"]
            sim_busy = any(p["status"] in ("starting", "processing") for p in fs.sim.predictions.values())
            if not busy and not sim_busy and time.monotonic() - still_since >= 3:
                return True, time.monotonic() - started
            time.sleep(0.5)
    return False, time.monotonic() - started


def _killed_tasks(fs: FaultStack) -> dict[int, tuple[str, int]]:
    ids = [f.detail["task_id"] for f in fs.faults if f.detail.get("task_id")]
    with db.connect(fs.url) as conn:
        rows = conn.execute("SELECT id, status, attempts FROM tasks WHERE id = ANY(%s)", (ids,)).fetchall()
    found = {r["id"]: (r["status"], r["attempts"]) for r in rows}
    return {i: found.get(i, ("missing", 0)) for i in ids}


def report(result: Result, rate: float) -> str:
    c = result.counts
    faults = {}
    for f in result.faults:
        faults[f.kind] = faults.get(f.kind, 0) + 1
    lines = [
        f"load: {rate:g} jobs/s for {result.load_seconds:.0f} s; {c.jobs_created} jobs created (201); "
        f"{result.acks_during_load} webhook deliveries answered 2xx during the load "
        f"({result.acks_during_load / result.load_seconds:.1f}/s)",
        "faults: " + ", ".join(f"{k} x{v}" for k, v in faults.items())
        + f"; service answered 2xx again after {sum(result.recovered)} of {len(result.recovered)}",
        f"tasks held by killed workers: {result.killed_tasks or 'none caught'} (status, attempts)",
        f"settled: {result.settled} after {result.settle_seconds:.1f} s",
        "deliveries: " + ", ".join(f"{k}: {v}" for k, v in sorted(c.deliveries.items(), key=str)),
        f"webhooks: {c.acknowledged} ids acknowledged 2xx; {c.recorded} recorded in events; "
        f"lost {c.lost}; recorded twice {c.recorded_twice}; "
        f"recorded but answer lost {c.recorded_unacknowledged}",
        f"jobs: {dict(c.jobs)}; not terminal {c.not_terminal}; 201 but missing {c.jobs_missing}",
        f"predictions: {c.predictions}; differing from the simulator {c.prediction_mismatches}; "
        f"replicate.polled events {c.polled}",
        f"outputs: {c.outputs_processed} output.processed, {c.outputs_failed} output.failed; "
        f"processed twice {c.processed_twice}; processed files {c.files}; "
        f"file problems {c.file_problems}; temp files {c.tmp_files}",
        f"tasks: {dict(c.tasks)}; claimed more than once {c.tasks_rerun}",
        f"replay --check: {c.replay_differences} differences",
        "result: " + ("all checks passed" if result.ok
                      else "FAILED: " + "; ".join(c.problems or ["see above"])),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of load")
    parser.add_argument("--rate", type=float, default=1.0, help="jobs created per second")
    parser.add_argument("--fault-every", type=float, default=20, help="seconds between faults")
    parser.add_argument("--drain", type=float, default=120, help="seconds to wait for everything to settle")
    parser.add_argument("--speed", type=float, default=10, help="simulator time compression")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the logs and files (prints where)")
    args = parser.parse_args()
    options = StackOptions(speed=args.speed, workers=args.workers, seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="faults-run-"))
    try:
        result = run_suite(tmp, duration=args.duration, rate=args.rate, fault_every=args.fault_every,
                           drain=args.drain, options=options, say=lambda s: print(s, flush=True))
        print(report(result, args.rate), flush=True)
    finally:
        if args.keep:
            print(f"logs and files kept in {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
