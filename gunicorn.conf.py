"""gunicorn settings for the web app: `gunicorn -c gunicorn.conf.py wsgi:app`.

Every value can be overridden from the environment (WEB_CONCURRENCY, WEB_THREADS, PORT,
HOST, WEB_TIMEOUT). On a HOST other than loopback the service must have a credential
(API_KEYS, Supabase user tokens) or ALLOW_OPEN_API=true: on_starting refuses otherwise.
Requests are short: a webhook records one event, the API reads the projection, so a few
threaded workers per core serve a lot; slow work is in the worker.
Sixteen threads a process: webhooks that arrive together are committed together (group
commit, service/groups.py), so a thread waiting on a commit costs the database nothing
and more of them make larger groups (scripts/bench/ingest.py measured 1.9 webhooks per
commit with four threads, 2.2-3.4 with eight, and less database CPU per webhook). And a
request that finds every thread busy waits in gunicorn's queue for one: with eight threads
and 16 connections that queue was half of a webhook's time (11 ms of 20 at the median,
issue 17); with sixteen, 0.6 ms.
"""

import gc
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from gunicorn.workers.gthread import ThreadWorker

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", max(2, multiprocessing.cpu_count())))


class TimedThreadWorker(ThreadWorker):
    """gunicorn's gthread worker, and each request's WSGI environ says when a thread took it
    up (`gunicorn.taken_at`, time.perf_counter) and how long it had waited for one
    (`gunicorn.queued_seconds`): from the moment the worker's main loop handed the readable
    connection to the thread pool. The webhook endpoint's stage timings start there
    (rjs_webhook_stage_seconds in /metrics). Two clock readings and a dict entry a request.
    The Flask app stays in `worker.application` (`worker.wsgi` is the stamping wrapper)."""

    _local = threading.local()

    def enqueue_req(self, conn):
        conn.queued_at = time.perf_counter()
        super().enqueue_req(conn)

    def handle(self, conn):
        taken = self._local.taken = time.perf_counter()
        self._local.queued = taken - getattr(conn, "queued_at", taken)
        return super().handle(conn)

    def load_wsgi(self):
        super().load_wsgi()
        self.application = app = self.wsgi
        local = self._local

        def stamped(environ, start_response):
            environ["gunicorn.taken_at"], environ["gunicorn.queued_seconds"] = local.taken, local.queued
            return app(environ, start_response)

        self.wsgi = stamped


worker_class = TimedThreadWorker
threads = int(os.environ.get("WEB_THREADS", "16"))
# A request that takes longer than this is stuck (the database statement timeout is 30 s).
timeout = int(os.environ.get("WEB_TIMEOUT", "60"))
graceful_timeout = 20
keepalive = 5
# Bound memory growth of long-lived workers; jitter so they do not restart together.
max_requests = 20000
max_requests_jitter = 2000
accesslog = "-"
errorlog = "-"
# Behind a proxy (Netlify, a load balancer) trust its forwarded headers only from loopback
# by default; set FORWARDED_ALLOW_IPS to the proxy's addresses in production.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")

# /metrics adds up the counters of every worker process (prometheus_client's multiprocess
# mode): they write them to files in this directory, which must exist, and be empty,
# before the workers import the app. ./run.sh passes one it shares with its worker process.
_own_metrics_dir = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _own_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="rjs-metrics-")


def on_starting(server):
    """Before gunicorn listens: refuse, with one line, to serve the service open on an address
    others can reach (service/exposure.py: no API_KEYS or Supabase user-token settings, no
    ALLOW_OPEN_API), then hand the workers the final binds (HOST, --bind or GUNICORN_CMD_ARGS)
    as HOST. Checked in a child process: importing the service here would load numpy and
    OpenCV into this process, and their threads do not survive the fork of the workers."""
    check = "import sys; from service.exposure import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run([sys.executable, "-c", check, *server.cfg.bind], cwd=server.cfg.chdir, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        for line in (done.stderr.strip() or f"the startup check failed ({done.returncode})").splitlines():
            server.log.error(line)
        sys.exit(done.returncode)
    os.environ["HOST"] = ",".join(server.cfg.bind)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)


def child_exit(server, worker):
    """A dead worker's live gauges stop counting; its counters stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    """On SIGTERM a worker finishes its requests and stops: /readyz says so at once, so a
    load balancer stops sending it new ones while it drains.

    And the app, loaded now, is kept out of Python's garbage collection: the ~70,000
    objects of the imports and the app live as long as the process, yet a full collection
    walks them all, with every thread stopped. Measured in process over 8,000 webhooks:
    one full collection, 98 ms before, 20 ms after, and a pause that long is in the p99."""
    gc.collect()  # what is garbage already is freed, not frozen
    gc.freeze()
    stop = signal.getsignal(signal.SIGTERM)

    def stopping(signum, frame):
        from service.health import shutting_down

        shutting_down(getattr(worker, "application", worker.wsgi)).set()
        stop(signum, frame)

    signal.signal(signal.SIGTERM, stopping)
