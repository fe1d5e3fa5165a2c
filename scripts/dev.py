"""Run the whole service locally: database, migrations, web app; print where to look.

Started by ./run.sh. With no DATABASE_URL it starts the embedded PostgreSQL in
.data/postgres (history survives restarts). Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dotenv import load_dotenv  # noqa: E402

from service import logs, migrations  # noqa: E402
from service.config import Settings  # noqa: E402
from service.db import connect, redact, resolve_database_url  # noqa: E402
from service.errors import ServiceError  # noqa: E402

logger = logging.getLogger("service.dev")


def port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def wait_healthy(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def start_web(host: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    command = [str(ROOT / ".venv" / "bin" / "gunicorn"), "wsgi:app", "--bind", f"{host}:{port}",
               "--workers", env.get("WEB_CONCURRENCY", "2"), "--threads", "4",
               "--access-logfile", "-", "--graceful-timeout", "10"]
    return subprocess.Popen(command, cwd=ROOT, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    args = parser.parse_args()
    load_dotenv(ROOT / ".env")
    try:
        settings = Settings.from_env()
        logs.configure(settings.LOG_LEVEL)
        url = resolve_database_url(settings.DATABASE_URL, settings.DATA_DIR)
        with connect(url, autocommit=True) as conn:
            applied = migrations.migrate(conn)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("migrations: %s", ", ".join(applied) if applied else "up to date",
                extra={"action": "migrate"})
    if not port_free(args.host, args.port):
        print(f"error: port {args.port} on {args.host} is in use; stop what uses it or run "
              f"./run.sh --port {args.port + 1}", file=sys.stderr)
        return 2

    env = dict(os.environ, DATABASE_URL=url)
    web = start_web(args.host, args.port, env)
    children = [web]

    def stop(*_: object) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()

    signal.signal(signal.SIGTERM, stop)
    base = f"http://{args.host}:{args.port}"
    if not wait_healthy(f"{base}/healthz", 60):
        stop()
        print("error: the web app did not become healthy within 60 s; see the log above",
              file=sys.stderr)
        return 1
    print(f"\n  Dashboard:  {base}/\n  Health:     {base}/healthz\n"
          f"  SQL:        psql '{redact(url)}'\n  Stop:       Ctrl-C\n", flush=True)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
        for child in children:
            child.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
