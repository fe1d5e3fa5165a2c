"""Benchmark post-processing end to end through the worker, against bare OpenCV on the same bytes.

    .venv/bin/python scripts/bench/imaging.py [--quick] [--repeats 9] [--images 40]

The issue's two cases: a 1024×1024 PNG → 2048×2048 (a 1:1 job, upscaled) and a 768×1344 PNG →
1080×1920 (a 9:16 job, cropped and resized), photograph-like pixels (structure at several scales
and sensor noise, so PNG costs what it costs on real outputs). Each is served from a local HTTP
server and run through Worker.run_once in this process — claim, job lookup, download, decode,
resize, encode, store original and result, record output.processed, finish the task — alternating
with bare OpenCV on the same bytes (imdecode, crop, resize, imencode with the interpolation and
PNG compression level the service uses; the outputs must come out byte-identical). Prints the
median wall times, their ratio (goal: at most 1.3×), the ratio of CPU times (steadier on a busy
machine) and where the worker's time goes. Then throughput: --images outputs through one and
through two `flask --app service worker` processes, images/s and worker CPU per image.

Scratch database on DATABASE_URL's server if set, else an embedded pgserver; files in a temp dir.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from common import ROOT, add_database_url, scratch_database, server, server_version

from service import create_app, db, imaging
from service.cli import handlers, worker_context
from service.worker import Worker
from tests.origin import Origin, succeeded

GOAL_RATIO = 1.3
TIMINGS = ("download_ms", "process_ms", "store_ms")  # what output.processed records of its time


@dataclass(frozen=True)
class Case:
    name: str
    source: tuple[int, int]
    ratio: str


CASES = (Case("1024×1024 → 2048×2048", (1024, 1024), "1:1"),
         Case("768×1344 → 1080×1920", (768, 1344), "9:16"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and images, for a smoke run")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per case (after one warm-up)")
    parser.add_argument("--images", type=int, default=40, help="images per throughput run")
    add_database_url(parser)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.images = min(args.repeats, 3), min(args.images, 12)
    return args


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """Photograph-like BGR: light and colour varying at several scales, plus sensor noise."""
    rng = np.random.default_rng(seed)
    long_side = max(width, height)

    def scale(cells: int, planes: int) -> np.ndarray:
        small = rng.normal(0, 1, (max(2, cells * height // long_side), max(2, cells * width // long_side),
                                  planes)).astype(np.float32)
        smooth = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        return smooth.reshape(height, width, planes)

    light = sum(w * scale(cells, 1) for cells, w in ((3, 55), (12, 30), (48, 15), (192, 7)))
    colour = sum(w * scale(cells, 3) for cells, w in ((4, 25), (24, 8)))
    pixels = 120 + light + colour + rng.normal(0, 2.0, (height, width, 3)).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def source_png(case: Case, seed: int) -> bytes:
    ok, buffer = cv2.imencode(".png", photo(*case.source, seed), [cv2.IMWRITE_PNG_COMPRESSION, 6])
    assert ok
    return buffer.tobytes()


def bare(data: bytes, plan: imaging.Plan, png_compression: int) -> bytes:
    """What the service does to the pixels, in OpenCV and nothing else."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if plan.crop is not None:
        x, y, w, h = plan.crop
        pixels = pixels[y:y + h, x:x + w]
    flag = imaging.INTERPOLATIONS[plan.interpolation]
    pixels = cv2.resize(pixels, (plan.width, plan.height), interpolation=flag)
    ok, buffer = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, png_compression])
    assert ok
    return buffer.tobytes()


@dataclass
class Runs:
    """Wall and CPU seconds (this process, all its threads) of each timed run."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def time(self, work: Callable[[], Any]) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        result = work()
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)
        return result

    def drop_first(self) -> None:
        del self.wall[0], self.cpu[0]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.0f} ms"


def service_config(url: str, storage: Path) -> dict[str, str]:
    """Settings for the service under test: scratch database, local files, the local origin allowed.
    Supabase and PUBLIC_BASE_URL are cleared, so an .env meant for real use cannot leak in."""
    return {"DATABASE_URL": url, "STORAGE_DIR": str(storage), "OUTPUT_ALLOWED_HOSTS": "127.0.0.1",
            "REPLICATE_API_BASE_URL": "http://127.0.0.1:9/v1", "REPLICATE_API_TOKEN": "bench",
            "SUPABASE_URL": "", "SUPABASE_SERVICE_ROLE_KEY": "", "PUBLIC_BASE_URL": ""}


# -- one image at a time, in this process --------------------------------------------------------------


def latency(url: str, storage: Path, origin: Origin, repeats: int) -> list[str]:
    """Per case: median end-to-end worker time vs bare OpenCV, the ratio, and the worker's breakdown."""
    app = create_app(service_config(url, storage) | {"LOG_LEVEL": "WARNING"})
    ctx = worker_context(app)
    worker = Worker(ctx, handlers())
    verdicts = []
    try:
        with db.connect(url, autocommit=True) as conn:
            for case in CASES:
                verdicts.append(_latency_case(case, worker, conn, origin, storage, repeats))
    finally:
        app.extensions["db_pool"].close()
    return verdicts


def _latency_case(case: Case, worker: Worker, conn, origin: Origin, storage: Path, repeats: int) -> str:
    data = source_png(case, seed=1)
    settings = imaging.ImagingSettings.from_config(worker.ctx.config)  # the service's, IMAGE_* included
    plan = imaging.plan(None, case.ratio, case.source, settings)
    print(f"\n{case.name}: source PNG {len(data) / 1e6:.2f} MB, plan {plan.action} "
          f"crop={plan.crop} → {plan.width}×{plan.height}, {plan.interpolation}, "
          f"PNG level {settings.png_compression}")
    runs, timings = {"bare": Runs(), "worker": Runs()}, []
    for i in range(repeats + 1):  # run 0 warms up: connections, caches, first-call costs
        job_id, _ = succeeded(conn, [origin.serve(f"/{case.ratio}/{i}.png", data)], aspect_ratio=case.ratio)
        work = {"bare": lambda: bare(data, plan, settings.png_compression), "worker": worker.run_once}
        order = ("bare", "worker") if i % 2 else ("worker", "bare")  # alternate: neither always goes first
        done = {name: runs[name].time(work[name]) for name in order}
        event = conn.execute("SELECT data FROM events WHERE stream = %s AND type = 'output.processed'",
                             (job_id,)).fetchone()
        assert done["worker"] and event is not None, f"the worker did not process {job_id}"
        stored = (storage / event["data"]["url"].split("/files/", 1)[1]).read_bytes()
        assert stored == done["bare"], "the worker's output differs from bare OpenCV's: not the same work"
        timings.append(event["data"]["timings"])
    for r in runs.values():
        r.drop_first()
    return _report(case, runs["bare"], runs["worker"], timings[1:], len(stored))


def _report(case: Case, bare_runs: Runs, worker_runs: Runs, timings: list[dict], size: int) -> str:
    bare_m, worker_m = statistics.median(bare_runs.wall), statistics.median(worker_runs.wall)
    parts = {k: statistics.median(t[k] for t in timings) / 1000 for k in TIMINGS}
    rest = worker_m - sum(parts.values())
    for label, r in (("bare OpenCV (decode+resize+encode)", bare_runs),
                     ("worker end to end (claim→recorded)", worker_runs)):
        print(f"  {label}: {ms(statistics.median(r.wall))}  median of {len(r.wall)} "
              f"(min {min(r.wall) * 1000:.0f}, max {max(r.wall) * 1000:.0f}); "
              f"CPU {statistics.median(r.cpu) * 1000:.0f} ms")
    print(f"    download {ms(parts['download_ms'])}   process {ms(parts['process_ms'])}   "
          f"store {ms(parts['store_ms'])}   claim+lookup+record {ms(rest)}")
    print(f"    output {size / 1e6:.2f} MB, byte-identical to bare OpenCV's")
    ratio, best = worker_m / bare_m, min(worker_runs.wall) / min(bare_runs.wall)
    cpu_ratio = statistics.median(worker_runs.cpu) / statistics.median(bare_runs.cpu)
    verdict = "meets" if ratio <= GOAL_RATIO else "MISSES"
    print(f"  ratio worker / bare: {ratio:.2f}× of median wall times ({verdict} the goal of at most "
          f"{GOAL_RATIO}×); {best:.2f}× of the fastest runs; {cpu_ratio:.2f}× of median CPU times")
    return (f"{case.name}: {ratio:.2f}× ({verdict} ≤ {GOAL_RATIO}×; fastest runs {best:.2f}×, "
            f"CPU {cpu_ratio:.2f}×)")


# -- throughput with worker processes ------------------------------------------------------------------


def start_workers(count: int, url: str, storage: Path, logs: Path) -> list[subprocess.Popen]:
    env = {**os.environ, **service_config(url, storage), "WORKER_POLL_SECONDS": "1", "LOG_LEVEL": "INFO",
           "PYTHONUNBUFFERED": "1", "FLASK_SKIP_DOTENV": "1"}
    procs = []
    for n in range(count):
        with (logs / f"worker-{count}-{n}.log").open("wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "flask", "--app", "service", "worker"],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 60
    for n, proc in enumerate(procs):
        log = logs / f"worker-{count}-{n}.log"
        while "worker started" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker {n} did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
    return procs


def cpu_seconds(procs: list[subprocess.Popen]) -> float | None:
    """User + system CPU the processes have used so far (Linux /proc), None where unknown."""
    total = 0
    try:
        for proc in procs:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    except (OSError, IndexError, ValueError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def throughput(url: str, storage: Path, origin: Origin, images: int, processes: int, logs: Path) -> float:
    """Images/s through `processes` worker processes, from the commit that enqueues them all to
    the last output.processed."""
    sources = [source_png(case, seed=10 + n) for n, case in enumerate(CASES)]
    procs = start_workers(processes, url, storage, logs)
    cpu_before = cpu_seconds(procs)
    try:
        with db.connect(url) as conn:
            with conn.transaction():
                jobs = [succeeded(conn, [origin.serve(f"/{processes}/{n}.png", sources[n % len(CASES)])],
                                  aspect_ratio=CASES[n % len(CASES)].ratio)[0] for n in range(images)]
            started = conn.execute("SELECT clock_timestamp() AS t").fetchone()["t"]
            conn.commit()
            while True:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE type = 'output.processed') AS done, "
                    "count(*) FILTER (WHERE type = 'output.failed') AS failed, max(recorded_at) AS last, "
                    "array_agg(data -> 'timings') FILTER (WHERE type = 'output.processed') AS timings "
                    "FROM events WHERE stream = ANY(%s) AND type IN ('output.processed', 'output.failed')",
                    (jobs,)).fetchone()
                conn.commit()
                if row["failed"]:
                    raise SystemExit(f"{row['failed']} outputs failed; see {logs}")
                if row["done"] == images:
                    break
                time.sleep(0.05)
        cpu_after = cpu_seconds(procs)
    finally:
        stop_workers(procs)
    seconds = (row["last"] - started).total_seconds()
    parts = {k: statistics.median(t[k] for t in row["timings"]) for k in TIMINGS}
    label = f"{processes} worker process{'es' if processes > 1 else ''}"
    print(f"  {label}: {images} images in {seconds:.2f} s = "
          f"{images / seconds:.2f} images/s   (median per image: download {parts['download_ms']:.0f} ms, "
          f"process {parts['process_ms']:.0f} ms, store {parts['store_ms']:.0f} ms)")
    if cpu_before is not None and cpu_after is not None:
        cpu = cpu_after - cpu_before
        print(f"    worker CPU: {cpu / images * 1000:.0f} ms per image; {cpu / seconds:.2f} CPUs busy with "
              f"the workers on average ({processes} process{'es' if processes > 1 else ''}, "
              f"{os.cpu_count()} CPUs, shared with whatever else runs)")
    return images / seconds


def main() -> None:
    args = parse_args()
    print(f"imaging benchmark: {args.repeats} timed runs per case, {args.images} images per throughput run; "
          f"{os.cpu_count()} CPUs, OpenCV {cv2.__version__} with {cv2.getNumThreads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    origin = Origin()
    with server(args.database_url) as (server_url, where), \
            scratch_database(server_url, f"bench_imaging_{os.getpid()}") as url, \
            tempfile.TemporaryDirectory(prefix="bench-imaging-") as tmp:
        print(f"PostgreSQL {server_version(url)} ({where}); files under {tmp}")
        storage, logs = Path(tmp) / "files", Path(tmp)
        verdicts = latency(url, storage, origin, args.repeats)
        print("\nthroughput (whole path, both cases alternating):")
        rates = [throughput(url, storage, origin, args.images, n, logs) for n in (1, 2)]
        print(f"  two processes / one: {rates[1] / rates[0]:.2f}×")
    origin.close()
    print(f"\nsummary: {'; '.join(verdicts)}; {rates[0]:.2f} images/s with one worker process, "
          f"{rates[1]:.2f} with two; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
