"""What must hold after a fault run, counted: every webhook acknowledged with a 2xx is in
`events` (once), every job is terminal, no output is processed twice (events and files),
the projections equal a replay, and each prediction ends as the simulator says it did."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from service import db
from service.replay import replay

TERMINAL = {"completed", "failed", "canceled"}


@dataclass
class Counts:
    deliveries: Counter = field(default_factory=Counter)   # simulator attempts by outcome
    acknowledged: int = 0                                   # webhook ids with a 2xx answer
    recorded: int = 0                                       # replicate.webhook events
    lost: int = 0                                           # acknowledged, not in events
    recorded_twice: int = 0
    recorded_unacknowledged: int = 0                        # committed, answer lost to a fault
    jobs_created: int = 0                                   # 201 answers to the load
    jobs_missing: int = 0                                   # a 201 whose job is not in jobs
    jobs: Counter = field(default_factory=Counter)          # by status
    not_terminal: int = 0
    predictions: int = 0
    prediction_mismatches: int = 0                          # final status differs from the simulator
    polled: int = 0                                         # replicate.polled events (reconciler, cancels)
    outputs_processed: int = 0
    outputs_failed: int = 0
    processed_twice: int = 0
    files: int = 0                                          # processed files in storage
    file_problems: int = 0                                  # missing, wrong size, or without an event
    tmp_files: int = 0
    tasks: Counter = field(default_factory=Counter)         # by kind/status
    tasks_rerun: int = 0                                    # claimed more than once (kills, crashes)
    replay_differences: int = -1
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(url: str, sim, created: list[str], storage: Path) -> Counts:
    c = Counts()
    with db.connect(url, autocommit=True) as conn:
        _webhooks(conn, sim, c)
        _jobs(conn, sim, created, c)
        _outputs(conn, storage, c)
        _tasks(conn, c)
        c.replay_differences = replay(conn, check=True).differences
    if c.replay_differences:
        c.problems.append(f"{c.replay_differences} projection rows differ from a replay")
    return c


def _webhooks(conn, sim, c: Counts) -> None:
    log = sim.webhook_log
    for attempt in log:
        code = attempt.response_code
        c.deliveries["dropped (simulator fault)" if attempt.dropped else
                      f"HTTP {code}" if code else "no HTTP answer"] += 1
    acked = {a.webhook_id for a in log if a.response_code and 200 <= a.response_code < 300}
    rows = conn.execute("SELECT event_key FROM events WHERE type = 'replicate.webhook'").fetchall()
    keys = Counter(r["event_key"] for r in rows)
    c.acknowledged, c.recorded = len(acked), len(rows)
    c.lost = len(acked - set(keys))
    c.recorded_twice = sum(n - 1 for n in keys.values())
    c.recorded_unacknowledged = len(set(keys) - acked)
    if c.lost:
        c.problems.append(f"{c.lost} acknowledged webhooks are not in events, e.g. "
                          f"{sorted(acked - set(keys))[:3]}")
    if c.recorded_twice:
        c.problems.append(f"{c.recorded_twice} webhook ids recorded more than once")


def _jobs(conn, sim, created: list[str], c: Counts) -> None:
    jobs = {str(r["id"]): r["status"] for r in conn.execute("SELECT id, status FROM jobs")}
    c.jobs_created, c.jobs = len(created), Counter(jobs.values())
    c.jobs_missing = sum(1 for job in created if job not in jobs)
    stuck = [job for job, status in jobs.items() if status not in TERMINAL]
    c.not_terminal = len(stuck)
    if c.jobs_missing:
        c.problems.append(f"{c.jobs_missing} jobs answered 201 are not in jobs")
    if stuck:
        c.problems.append(f"{len(stuck)} jobs not terminal, e.g. {stuck[:3]}")
    truth = sim.predictions
    rows = conn.execute("SELECT id, status FROM predictions WHERE job_id IS NOT NULL").fetchall()
    c.predictions = len(rows)
    wrong = [r["id"] for r in rows if r["id"] in truth and truth[r["id"]]["status"] != r["status"]]
    c.prediction_mismatches = len(wrong) + sum(1 for r in rows if r["id"] not in truth
                                               and not r["id"].startswith("unsubmitted-"))
    if c.prediction_mismatches:
        c.problems.append(f"{c.prediction_mismatches} predictions differ from the simulator, "
                          f"e.g. {wrong[:3]}")
    c.polled = conn.execute("SELECT count(*) AS n FROM events WHERE type = 'replicate.polled'"
                            ).fetchone()["n"]


def _outputs(conn, storage: Path, c: Counts) -> None:
    rows = conn.execute("SELECT data FROM events WHERE type = 'output.processed'").fetchall()
    c.outputs_processed = len(rows)
    per_output = Counter((r["data"]["prediction_id"], r["data"]["index"]) for r in rows)
    c.processed_twice = sum(n - 1 for n in per_output.values())
    c.outputs_failed = conn.execute("SELECT count(*) AS n FROM events WHERE type = 'output.failed'"
                                    ).fetchone()["n"]
    if c.processed_twice:
        c.problems.append(f"{c.processed_twice} outputs recorded as processed more than once")
    _files(rows, storage, c)


def _files(rows: list[dict], storage: Path, c: Counts) -> None:
    """One processed file and one original per output.processed, of the recorded sizes; no
    other files, no temporary ones left behind."""
    expected = {}
    for r in rows:
        d = r["data"]
        expected[_local(storage, d["url"])] = d["bytes"]
        expected[_local(storage, d["original_url"])] = d["original_bytes"]
    on_disk = {p: p.stat().st_size for p in storage.rglob("*") if p.is_file() and not p.name.startswith(".")}
    c.files = sum(1 for p in on_disk if ".original." not in p.name)
    c.tmp_files = sum(1 for p in storage.rglob(".*.tmp"))
    c.file_problems = sum(1 for p, size in expected.items() if on_disk.get(p) != size) + \
        sum(1 for p in on_disk if p not in expected)
    if c.file_problems or c.files != c.outputs_processed:
        c.problems.append(f"stored files do not match output.processed: {c.files} processed files for "
                          f"{c.outputs_processed} events, {c.file_problems} missing, wrong size or "
                          "unrecorded")


def _local(storage: Path, url: str) -> Path:
    return storage / urlsplit(url).path.removeprefix("/files/")


def _tasks(conn, c: Counts) -> None:
    rows = conn.execute("SELECT kind, status, attempts FROM tasks").fetchall()
    c.tasks = Counter(f"{r['kind']} {r['status']}" for r in rows)
    c.tasks_rerun = sum(1 for r in rows if r["attempts"] > 1)
    unfinished = sum(1 for r in rows if r["status"] in ("queued", "running"))
    if unfinished:
        c.problems.append(f"{unfinished} tasks still queued or running")
