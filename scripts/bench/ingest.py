"""Benchmark webhook ingestion: the real endpoint against a bare Flask handler, same gunicorn.

    .venv/bin/python scripts/bench/ingest.py [--seconds 30] [--connections 16] [--quick]

Signed webhooks with unique ids, over --connections keep-alive connections for --seconds,
first against the service (`gunicorn -c gunicorn.conf.py wsgi:app`), then against
scripts/bench/bare_app.py (one POST route that reads the body and answers 200 JSON) under
the same gunicorn config file and bind options, then against scripts/bench/recorded_app.py
(verify the signature, parse, one idempotent INSERT into a copy of the events table,
committed alone: the webhook contract's least durable work per request, without the fold;
its ratio to the bare handler bounds a service that commits each webhook on its own, which
the service no longer does: it commits webhooks that arrive together as one group).
Prints requests/s, p50 and p99 of each and the ratios, the CPU each request cost in
gunicorn, PostgreSQL (the scratch database's backends) and wrk, how many webhooks each of
the service's commits held (its group commit, from /metrics), then checks the event
store: every webhook acknowledged with a 200 is in `events` exactly once, and the
projections equal a rebuild from the events.

The load generator is wrk (Debian: `apt-get install -y wrk`) running ingest.lua, which
replays requests this script built and signed just before each run (Standard Webhooks,
timestamp = signing time, so well inside the five-minute window): each request is sent
at most once, so every webhook-id is unique. How many to build comes from a short warm-up
against the same server (its rate times --seconds times --headroom).

The workload, the same for both servers: each prediction gets its webhooks in lifecycle
order (75% starting, processing, more logs, succeeded; 15% starting, processing, failed;
10% starting, canceled), interleaved over a window of 256 predictions in flight, bodies
from the real payloads in tests/fixtures/replicate/payloads with the prediction id replaced.
80% of predictions belong to a job (1-4 predictions each): the job's job.created and
prediction.submitted events are recorded before the run and the webhook URL carries
?job=<id>&step=1&index=<n>, as the service's own webhook URLs do, so the job fold runs;
20% are orphans (no ?job=, a prediction the service never created).

Logging is the project's default for both servers: gunicorn's access log as
gunicorn.conf.py sets it (to stdout, here a file) and LOG_LEVEL unset (INFO: one line per
webhook); --quiet-logs sets LOG_LEVEL=WARNING and turns the access log off for both.

Creates a scratch database (on DATABASE_URL's server if set, else on an embedded pgserver
in a temp dir), migrated by service.migrations, and drops it at the end.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import json
import math
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import stages
from common import (
    PROMPTS,
    RECORDED_TABLE,
    ROOT,
    TEMPLATES,
    add_database_url,
    scratch_database,
    server,
    server_version,
    templates,
)

from service import db
from service.replay import replay

LUA = Path(__file__).with_name("ingest.lua")
GOAL_THROUGHPUT = 0.5  # at least this fraction of the bare handler's requests/s
GOAL_P99 = 2.0  # at most this multiple of the bare handler's p99
WINDOW = 256  # predictions in flight at once in the generated stream
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
LIFECYCLES = [  # (share, template names in delivery order)
    (0.75, ("starting", "processing", "more_logs", "succeeded")),
    (0.15, ("starting", "processing", "failed")),
    (0.10, ("starting", "canceled")),
]
JOB_SHARE = 0.8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=30, help="length of each measured run")
    parser.add_argument("--connections", type=int, default=16, help="concurrent keep-alive connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1 is plenty here)")
    parser.add_argument("--quick", action="store_true", help="a 5 s smoke run (2 s warm-ups)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per server")
    parser.add_argument("--warmup-max-rate", type=int, default=8000,
                        help="requests/s the warm-up's pre-generated requests would last for")
    parser.add_argument("--headroom", type=float, default=2.5,
                        help="requests generated per run = warm-up rate x seconds x this")
    parser.add_argument("--quiet-logs", action="store_true",
                        help="LOG_LEVEL=WARNING and no gunicorn access log, for both servers")
    parser.add_argument("--no-replay-check", action="store_true",
                        help="skip checking that the projections equal a rebuild from events")
    parser.add_argument("--mix", choices=("both", "real", "orphans"), default="both",
                        help="the service's workload: the real mix (80%% of predictions in jobs), "
                             "orphans only (no job: the cheapest path), or both, side by side")
    parser.add_argument("--seed", type=int, default=20240611)
    add_database_url(parser)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup = 5, 2
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads")
    return args


# ---------------------------------------------------------------- the workload

@dataclass
class Webhook:
    webhook_id: str
    query: str
    body: bytes


@dataclass
class Plan:
    webhooks: list[Webhook] = field(default_factory=list)
    # events to record before the run: (event_key, stream, type, data)
    setup: list[tuple[str, str, str, dict]] = field(default_factory=list)
    predictions: int = 0
    job_predictions: int = 0
    jobs: int = 0


class Workload:
    """Generates webhook streams from the real payloads; ids never repeat across plans."""

    def __init__(self, seed: int, job_share: float = JOB_SHARE) -> None:
        self.rng = random.Random(seed)
        self.job_share = job_share
        self.tag = f"{seed:x}{secrets.token_hex(3)}"
        self.serial = 0
        self.bodies = templates()
        # compact JSON text of each template with its prediction id as a placeholder
        self.texts = {name: json.dumps(body, separators=(",", ":")).replace(body["id"], "{PID}")
                      for name, body in self.bodies.items()}
        self.starting = self.bodies["starting"]

    def prediction_id(self) -> str:
        return "".join(self.rng.choices(ALPHABET, k=26))

    def plan(self, n: int) -> Plan:
        plan = Plan()
        rng = self.rng
        active: list[list] = []  # [prediction id, query, remaining template names]
        pending: list[list] = []  # predictions of the current job not yet in flight

        def new_prediction() -> list:
            if pending:
                return pending.pop()
            lifecycle = rng.choices([names for _, names in LIFECYCLES],
                                    weights=[share for share, _ in LIFECYCLES])[0]
            if rng.random() >= self.job_share:
                plan.predictions += 1
                return [self.prediction_id(), "", list(lifecycle)]
            job = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            count = rng.randint(1, 4)
            prompt = rng.choice(PROMPTS)
            plan.jobs += 1
            plan.setup.append((f"created:{job}", job, "job.created", {
                "model": self.starting["model"], "version": self.starting["version"],
                "input": {"prompt": prompt}, "aspect_ratio": "1:1", "count": count}))
            for index in range(count):
                pid = self.prediction_id()
                created = json.loads(self.texts["starting"].replace("{PID}", pid))
                plan.setup.append((f"submitted:{job}:1:{index}", job, "prediction.submitted",
                                   {"step": 1, "index": index, "prediction": created}))
                lifecycle = rng.choices([names for _, names in LIFECYCLES],
                                        weights=[share for share, _ in LIFECYCLES])[0]
                pending.append([pid, f"?job={job}&step=1&index={index}", list(lifecycle)])
                plan.predictions += 1
                plan.job_predictions += 1
            return pending.pop()

        while len(plan.webhooks) < n:
            while len(active) < WINDOW:
                active.append(new_prediction())
            slot = rng.randrange(len(active))
            pid, query, names = active[slot]
            body = self.texts[names.pop(0)].replace("{PID}", pid).encode()
            self.serial += 1
            plan.webhooks.append(Webhook(f"msg_bench_{self.tag}_{self.serial}", query, body))
            if not names:
                active[slot] = active[-1]
                active.pop()
        return plan


def record_setup(url: str, plan: Plan) -> None:
    """job.created and prediction.submitted for the plan's jobs, through append_event."""
    rows = [{"key": k, "stream": s, "type": t, "data": d} for k, s, t, d in plan.setup]
    with db.connect(url, autocommit=True) as conn:
        for lo in range(0, len(rows), 2000):
            conn.execute("""
                SELECT count(*) FROM jsonb_to_recordset(%s::jsonb)
                    AS t(key text, stream text, type text, data jsonb)
                CROSS JOIN LATERAL append_event(t.key, t.stream, t.type, t.data,
                                                '{"source": "bench"}'::jsonb)
            """, (json.dumps(rows[lo:lo + 2000]),))


def signed_requests(webhooks: list[Webhook], secret: str, port: int) -> list[bytes]:
    """Raw HTTP/1.1 requests, signed now (Standard Webhooks: HMAC-SHA256 of id.timestamp.body)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    ts = str(int(time.time()))
    out = []
    for w in webhooks:
        mac = hmac.new(key, f"{w.webhook_id}.{ts}.".encode() + w.body, hashlib.sha256).digest()
        head = (f"POST /webhooks/replicate{w.query} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\n"
                f"User-Agent: bench-ingest\r\n"
                f"Content-Type: application/json\r\n"
                f"Content-Length: {len(w.body)}\r\n"
                f"webhook-id: {w.webhook_id}\r\n"
                f"webhook-timestamp: {ts}\r\n"
                f"webhook-signature: v1,{base64.b64encode(mac).decode()}\r\n\r\n")
        out.append(head.encode() + w.body)
    return out


# ---------------------------------------------------------------- servers and load

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gunicorn(app: str, env: dict[str, str], log: Path, quiet: bool) -> Iterator[tuple[int, int]]:
    """`gunicorn -c gunicorn.conf.py APP` on a free loopback port; stopped (by pid) afterwards."""
    port = free_port()
    env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(port)}
    extra = ["--access-logfile", "/dev/null"] if quiet else []
    if Path(__file__).with_name(app.split(":")[0] + ".py").exists():  # a baseline app of ours
        extra += ["--pythonpath", str(Path(__file__).parent)]
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *extra, app],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, proc, log)
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"gunicorn exited with {proc.returncode}; its log:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"gunicorn did not answer on port {port} within {timeout:.0f} s")


class CpuMeter:
    """CPU seconds used during a run by the gunicorn master and its workers (workers it
    reaped count through the master's children's time), by the PostgreSQL backends
    connected to the scratch database (sampled every half second, so a backend that
    exits, as a recycled worker's connections do, keeps what it had used), and by wrk."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, master: int, server_url: str | None, database: str | None) -> None:
        self.master, self.server_url, self.database = master, server_url, database
        self.backends: dict[int, list[float]] = {}  # pid -> [first seen, last seen]
        self.stopping = threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)

    @classmethod
    def _stat(cls, pid: int) -> list[str]:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return []
        return text[text.rindex(")") + 2:].split()

    @classmethod
    def _cpu(cls, pid: int, children: bool = False) -> float | None:
        f = cls._stat(pid)
        if not f:
            return None
        ticks = int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if children else 0)
        return ticks / cls.TICK

    def gunicorn(self) -> float:
        total = self._cpu(self.master, children=True) or 0.0
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (f := self._stat(int(entry.name))) and f[1] == str(self.master):
                total += self._cpu(int(entry.name)) or 0.0
        return total

    def _sample(self) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            while True:
                pids = [r[0] for r in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    (self.database,))]
                for pid in pids:
                    if (cpu := self._cpu(pid)) is not None:
                        self.backends.setdefault(pid, [cpu, cpu])[1] = cpu
                if self.stopping.wait(0.5):
                    return

    def __enter__(self) -> CpuMeter:
        self.started = self.gunicorn()
        self.wrk_started = resource.getrusage(resource.RUSAGE_CHILDREN)
        if self.database:
            self.sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gunicorn_seconds = self.gunicorn() - self.started
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.wrk_seconds = (used.ru_utime + used.ru_stime
                            - self.wrk_started.ru_utime - self.wrk_started.ru_stime)
        if self.database:
            self.stopping.set()
            self.sampler.join()
        self.postgres_seconds = sum(last - first for first, last in self.backends.values())


@dataclass
class Load:
    seconds: float
    requests: int
    p50_ms: float
    p99_ms: float
    statuses: Counter
    bodies: list[tuple[int, str]]
    errors: dict[str, int]
    exhausted: bool
    cpu: CpuMeter | None = None
    groups: str | None = None
    breakdown: stages.Breakdown | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def non_200(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200)


def _is_error(line: str) -> bool:
    """An error line of the server's log, in the text or the JSON log format."""
    return any(mark in line for mark in ("Traceback", " ERROR ", "[ERROR]", "CRITICAL",
                                         '"level": "ERROR"', '"level":"ERROR"'))


def run_wrk(requests: list[bytes], port: int, seconds: int, connections: int, threads: int,
            workdir: Path) -> Load:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    for t in range(threads):
        with open(workdir / f"requests.{t}", "wb") as f:
            for raw in requests[t::threads]:
                f.write(b"%d\n" % len(raw))
                f.write(raw)
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
           "-s", str(LUA), f"http://127.0.0.1:{port}"]
    done = subprocess.run(cmd, env={**os.environ, "INGEST_DIR": str(workdir)},
                          capture_output=True, text=True)
    if done.returncode != 0 or not (workdir / "summary").exists():
        sys.exit(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    summary = {k: float(v) for k, v in
               (line.split() for line in (workdir / "summary").read_text().splitlines())}
    bodies = []
    for line in (workdir / "responses").read_text().splitlines():
        if line.strip():
            status, _, body = line.partition(" ")
            bodies.append((int(status), body.strip()))
    statuses = Counter(status for status, _ in bodies)
    errors = {k: int(summary[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")}
    load = Load(seconds=summary["duration_us"] / 1e6, requests=len(bodies),
                p50_ms=summary["p50_us"] / 1000, p99_ms=summary["p99_us"] / 1000,
                statuses=statuses, bodies=bodies, errors=errors, exhausted=summary["exhausted"] > 0)
    shutil.rmtree(workdir)
    return load


# ---------------------------------------------------------------- the two targets

@dataclass
class Target:
    name: str
    app: str
    env: dict[str, str]
    database_url: str | None  # where to record the plan's setup events, for the real app
    server_url: str | None = None  # and the server and database whose backends' CPU to count
    database: str | None = None


def measure(target: Target, workload: Workload, args: argparse.Namespace, secret: str,
            tmp: Path, label: str | None = None) -> tuple[Load, Plan, dict]:
    label = label or target.name
    log = tmp / f"{target.name}.log"
    with gunicorn(target.app, target.env, log, args.quiet_logs) as (port, master):
        warm_plan = workload.plan(math.ceil(args.warmup * args.warmup_max_rate))
        if target.database_url:
            record_setup(target.database_url, warm_plan)
        warm = run_wrk(signed_requests(warm_plan.webhooks, secret, port), port, args.warmup,
                       args.connections, args.threads, tmp / "wrk")
        rate = warm.rate if not warm.exhausted else args.warmup_max_rate * 2
        n = math.ceil(rate * args.seconds * args.headroom) + 1000
        plan = workload.plan(n)
        print(f"  {label}: warm-up {warm.rate:,.0f} requests/s; generating {n:,} requests "
              f"({plan.predictions:,} predictions, {plan.jobs:,} jobs)", flush=True)
        before = {}
        if target.database_url:
            record_setup(target.database_url, plan)
            before = counts(target.database_url)
        requests = signed_requests(plan.webhooks, secret, port)
        metrics_before = stages.scrape(port) if target.database_url else {}
        log_offset = log.stat().st_size
        with CpuMeter(master, target.server_url, target.database) as cpu:
            load = run_wrk(requests, port, args.seconds, args.connections, args.threads, tmp / "wrk")
        load.cpu = cpu
        if target.database_url:
            during = stages.delta(metrics_before, stages.scrape(port), "rjs_webhook_")
            load.groups = stages.group_sizes(during)
            with open(log, "rb") as f:
                f.seek(log_offset)
                load.breakdown = stages.Breakdown.read(f.read().decode(errors="replace").splitlines(), during)
        del requests
    problems = [line for line in log.read_text(errors="replace").splitlines() if _is_error(line)]
    if problems:
        print(f"  {label}: {len(problems)} error lines in the server log, e.g. {problems[0][:200]}")
    return load, plan, before


def counts(url: str) -> dict:
    with db.connect(url) as conn:
        return conn.execute("""
            SELECT count(*) AS events, coalesce(max(position), 0) AS last FROM events""").fetchone()


@dataclass
class Check:
    events: int
    run_events: int
    acknowledged: int
    lost: int
    duplicated: int
    unacknowledged_recorded: int
    differences: int | None


def check_store(url: str, load: Load, before: dict, tag: str, replay_check: bool) -> Check:
    positions, duplicates = [], 0
    for status, body in load.bodies:
        if status == 200:
            answer = json.loads(body)
            if answer["status"] == "duplicate":
                duplicates += 1
            positions.append(answer["position"])
    duplicates += len(positions) - len(set(positions))
    with db.connect(url) as conn:
        total = conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"]
        lost = conn.execute("""
            SELECT count(*) AS n FROM unnest(%s::bigint[]) AS a(position)
            WHERE NOT EXISTS (SELECT FROM events e WHERE e.position = a.position
                                                    AND e.event_key LIKE %s)
        """, (sorted(set(positions)), f"msg_bench_{tag}_%")).fetchone()["n"]
        run = conn.execute("SELECT count(*) AS n, count(DISTINCT event_key) AS keys FROM events "
                           "WHERE position > %s AND event_key LIKE 'msg_bench_%%'",
                           (before["last"],)).fetchone()
        duplicates += run["n"] - run["keys"]
        differences = None
        if replay_check:
            differences = replay(conn, check=True).differences
    return Check(events=total, run_events=run["n"], acknowledged=len(positions), lost=lost,
                 duplicated=duplicates, unacknowledged_recorded=run["n"] - len(set(positions)),
                 differences=differences)


def gunicorn_settings() -> str:
    spec = {}
    exec(compile((ROOT / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"), spec)
    worker = getattr(spec["worker_class"], "__name__", spec["worker_class"])
    return (f"workers={spec['workers']} worker_class={worker} threads={spec['threads']} "
            f"keepalive={spec['keepalive']} max_requests={spec['max_requests']}")


def report(services: list[tuple[str, Load, Check]], bare: Load, alone: Load) -> None:
    loads = [*((name, load) for name, load, _ in services),
             ("bare Flask handler", bare), ("verify + record alone", alone)]
    print()
    print(f"{'':<30}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'requests':>10}{'non-200':>9}"
          f"{'errors':>8}")
    for name, load in loads:
        print(f"{name:<30}{load.rate:>12,.0f}{load.p50_ms:>10.1f}{load.p99_ms:>10.1f}"
              f"{load.requests:>10,}{load.non_200:>9,}{sum(load.errors.values()):>8,}")
    for name, load, _ in services:
        print(f"{'ratio ' + name.removeprefix('service, ') + ' / bare':<30}{load.rate / bare.rate:>11.2f}x"
              f"{load.p50_ms / bare.p50_ms:>9.2f}x{load.p99_ms / bare.p99_ms:>9.2f}x")
    print(f"{'ceiling: record / bare':<30}{alone.rate / bare.rate:>11.2f}x"
          f"{alone.p50_ms / bare.p50_ms:>9.2f}x{alone.p99_ms / bare.p99_ms:>9.2f}x"
          "  (verify + one idempotent INSERT committed per request, no fold)")
    print(f"CPU per request (us):{'gunicorn':>17}{'postgres':>10}{'wrk':>10}{'total':>10}   cores busy")
    for name, load in loads:
        if load.cpu:
            used = (load.cpu.gunicorn_seconds, load.cpu.postgres_seconds, load.cpu.wrk_seconds)
            per = [seconds / load.requests * 1e6 for seconds in used]
            print(f"  {name:<28}{per[0]:>8,.0f}{per[1]:>10,.0f}{per[2]:>10,.0f}{sum(per):>10,.0f}"
                  f"{sum(used) / load.seconds:>10.2f} of {os.cpu_count()}")
    for name, load, _ in services:
        ratio = cpu_per_request(bare) / cpu_per_request(load)
        print(f"CPU ratio, bare's CPU per request / {name}'s: {ratio:.2f}x "
              "(what the throughput ratio tends to when both are CPU-bound)")
    for name, load, _ in services:
        print(f"\n{name}: group commit: {load.groups}\n{name}: where a webhook's time went "
              "(the measured run's log lines; the slowest 1% by time in server):")
        load.breakdown.print(load.p50_ms, load.p99_ms)
    print()
    met = True
    for name, load, check in services:
        met = report_goals(name, load, bare, check) and met
    print(f"result: {'all goals met' if met else 'NOT all goals met'}")


def cpu_per_request(load: Load) -> float:
    return (load.cpu.gunicorn_seconds + load.cpu.postgres_seconds + load.cpu.wrk_seconds) / load.requests


def report_goals(name: str, app: Load, bare: Load, check: Check) -> bool:
    throughput, p99 = app.rate / bare.rate, app.p99_ms / bare.p99_ms
    verdict = "met" if throughput >= GOAL_THROUGHPUT else "NOT met"
    print(f"{name}: goal throughput >= {GOAL_THROUGHPUT}x: {verdict} "
          f"({throughput:.2f}x of bare's {bare.rate:,.0f}/s); p99 <= {GOAL_P99:.0f}x: "
          f"{'met' if p99 <= GOAL_P99 else 'NOT met'} ({p99:.2f}x of bare's {bare.p99_ms:.1f} ms)")
    for what, load in ((name, app), ("bare", bare)):
        if load.non_200:
            print(f"  {what} non-200 responses: {dict(load.statuses)}")
        if any(load.errors.values()):
            print(f"  {what} socket errors: {load.errors}")
        if load.exhausted:
            print(f"  WARNING: {what} used up its pre-generated requests before the end: its rate "
                  "is understated; rerun with a larger --headroom")
    print(f"  events: {check.events:,} rows in events afterwards; {check.run_events:,} webhooks recorded "
          f"during the measured run, {check.acknowledged:,} of them acknowledged with 200")
    print(f"  lost (200 but not in events): {check.lost}; duplicated: {check.duplicated}; "
          f"recorded without a 200 seen (in flight when the run stopped): {check.unacknowledged_recorded}")
    if check.differences is not None:
        same = "equal" if check.differences == 0 else f"DIFFER in {check.differences} rows from"
        print(f"  projections {same} a rebuild from the events (replay check)")
    return (check.lost == 0 and check.duplicated == 0 and app.non_200 == 0 and not check.differences
            and throughput >= GOAL_THROUGHPUT and p99 <= GOAL_P99)


def main() -> None:
    args = parse_args()
    if not shutil.which("wrk"):
        sys.exit("this benchmark needs the load generator wrk: apt-get install -y wrk")
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    mixes = {"real": ("service, real mix", JOB_SHARE), "orphans": ("service, orphans only", 0.0)}
    workloads = [(label, Workload(args.seed + i, share))
                 for i, (key, (label, share)) in enumerate(mixes.items()) if args.mix in (key, "both")]
    logs = "LOG_LEVEL=WARNING, no access log" if args.quiet_logs else \
        "project default (LOG_LEVEL=INFO, access log as gunicorn.conf.py sets it, to a file)"
    with server(args.database_url) as (server_url, where), tempfile.TemporaryDirectory(
            prefix="bench-ingest-") as tmpdir:
        tmp = Path(tmpdir)
        print(f"server: {where}, PostgreSQL {server_version(server_url)}")
        print(f"load: wrk, {args.connections} connections, {args.threads} thread(s), {args.seconds} s "
              f"per server after a {args.warmup:g} s warm-up; gunicorn.conf.py: {gunicorn_settings()}")
        print(f"logging: {logs}")
        print(f"workload: {LIFECYCLE_TEXT}")
        name = f"bench_ingest_{os.getpid()}"
        with scratch_database(server_url, name) as url:
            level = {"LOG_LEVEL": "WARNING"} if args.quiet_logs else {}
            service = Target("service", "wsgi:app",
                             {"DATABASE_URL": url, "REPLICATE_WEBHOOK_SECRET": secret, **level}, url,
                             server_url, name)
            bare = Target("bare", "bare_app:app", level, None)
            alone = Target("record-alone", "recorded_app:app",
                           {"DATABASE_URL": url, "REPLICATE_WEBHOOK_SECRET": secret, **level}, None,
                           server_url, name)
            with db.connect(url, autocommit=True) as conn:
                conn.execute(RECORDED_TABLE)
            services = []
            for label, workload in workloads:
                load, _, before = measure(service, workload, args, secret, tmp, label)
                services.append((label, load, check_store(url, load, before, workload.tag,
                                                          not args.no_replay_check)))
            bare_load, _, _ = measure(bare, workloads[0][1], args, secret, tmp)
            alone_load, _, _ = measure(alone, workloads[0][1], args, secret, tmp)
            report(services, bare_load, alone_load)
        print("scratch database dropped")


LIFECYCLE_TEXT = (
    "real Replicate payloads (" + ", ".join(TEMPLATES.values()) + ") with fresh prediction ids; "
    "per prediction 75% starting>processing>more logs>succeeded, 15% starting>processing>failed, "
    "10% starting>canceled; 80% of predictions in jobs of 1-4 (job.created and prediction.submitted "
    "recorded first, webhook URL ?job=&step=1&index=), 20% orphans (--mix orphans: all orphans); "
    "256 predictions in flight")

if __name__ == "__main__":
    main()
