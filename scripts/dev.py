"""Run the whole service locally: database, migrations, web app, worker, and (without a
REPLICATE_API_TOKEN) the local Replicate simulator; print where to look.

Started by ./run.sh. With no DATABASE_URL it starts the embedded PostgreSQL in
.data/postgres (history survives restarts). Ctrl-C stops everything it started.

While it runs, .flaskenv in the checkout holds the settings it chose itself (the simulator's
URL and token, PUBLIC_BASE_URL), so `flask --app service ...` in another terminal reaches the
same simulator: Flask's CLI reads .flaskenv (and .env) through python-dotenv, and never lets
either override a variable already set. It is removed when the run stops.
"""

from __future__ import annotations

import argparse
import json
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

from service import exposure, logs, migrations  # noqa: E402
from service.config import Settings  # noqa: E402
from service.db import connect, redact, resolve_database_url  # noqa: E402
from service.errors import ConfigError, ServiceError  # noqa: E402

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


def metrics_dir(data_dir: str) -> str:
    """The directory the web processes and the worker share their metrics through, without
    the files of an earlier run (prometheus_client's *.db; nothing else is touched)."""
    path = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or Path(data_dir) / "metrics")
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return str(path)


def start_simulator(host: str, port: int) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "scripts" / "replicate_sim.py"), "--host", host,
               "--port", str(port)]
    return subprocess.Popen(command, cwd=ROOT)


def start_worker(env: dict[str, str]) -> subprocess.Popen:
    command = [str(ROOT / ".venv" / "bin" / "flask"), "--app", "service", "worker"]
    # Its settings are all in env already (.env loaded above); .flaskenv is for other terminals.
    return subprocess.Popen(command, cwd=ROOT, env=dict(env, FLASK_SKIP_DOTENV="1"))


FLASKENV_HEADER = """\
# Written by ./run.sh (scripts/dev.py) while it runs, and removed when it stops: the settings
# it chose itself, so `flask --app service ...` in another terminal reaches the same local
# services. Flask's CLI reads this file and .env; your environment and .env win over it.
"""
# What the run command may choose for itself; the database needs nothing here (the CLI
# finds the same embedded one, or DATABASE_URL from .env), and none of these is a secret.
CHOSEN = ("PUBLIC_BASE_URL", "REPLICATE_API_BASE_URL", "REPLICATE_API_TOKEN",
          "REPLICATE_WEBHOOK_SECRET", "OUTPUT_ALLOWED_HOSTS")


def write_flaskenv(path: Path, given: dict[str, str], env: dict[str, str]) -> bool:
    """Write the settings env has that the user did not give (or gave otherwise); False
    when path is someone's own .flaskenv, which is left alone."""
    if path.exists() and not path.read_text().startswith(FLASKENV_HEADER):
        print(f"note: {path} is not ours, so it is left alone; `flask` commands in another "
              "terminal will not know this run's simulator", file=sys.stderr)
        return False
    lines = [f"{name}={json.dumps(env[name])}" for name in CHOSEN
             if name in env and given.get(name) != env[name]]
    path.write_text(FLASKENV_HEADER + "".join(line + "\n" for line in lines))
    return True


def replicate_env(args: argparse.Namespace, env: dict[str, str]) -> tuple[dict[str, str], bool]:
    """Without a REPLICATE_API_TOKEN, point the service at the local simulator."""
    public = env.get("PUBLIC_BASE_URL") or f"http://{args.host}:{args.port}"
    env = dict(env, PUBLIC_BASE_URL=public)
    if env.get("REPLICATE_API_TOKEN"):
        return env, False
    sim = f"http://{args.host}:{args.sim_port}/v1"
    # The simulator serves its outputs itself; downloads must be allowed from it.
    allowed = ",".join(filter(None, [env.get("OUTPUT_ALLOWED_HOSTS", ""), args.host]))
    return dict(env, REPLICATE_API_BASE_URL=sim, REPLICATE_API_TOKEN="local-simulator",
                REPLICATE_WEBHOOK_SECRET="", OUTPUT_ALLOWED_HOSTS=allowed), True


def start_web(host: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    command = [str(ROOT / ".venv" / "bin" / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"),
               "--bind", f"{host}:{port}", "wsgi:app"]
    return subprocess.Popen(command, cwd=ROOT, env=env)


BANNER = """
  Dashboard:  {base}/
  API:        {base}/api/jobs   (OpenAPI: {base}/api/openapi.json)
  Replicate:  {replicate}
  Webhooks:   {public}/webhooks/replicate
  SQL:        psql '{database}'
  CLI:        {cli}
  Stop:       Ctrl-C

  Try it:
    curl -s -X POST {base}/api/jobs -H 'Content-Type: application/json' \\
      -d '{{"model": "stability-ai/sdxl", "count": 2,
           "input": {{"prompt": "a lighthouse", "aspect_ratio": "3:4"}}}}'
  (aspect_ratio inside input: the model draws 3:4; at the top level it only tells the
  post-processing, which crops the model's square to 3:4)
"""


def banner(base: str, url: str, env: dict[str, str], simulated: bool, sim_url: str,
           flaskenv: Path | None) -> str:
    """flaskenv: the file this run's settings were written to, None if they were not."""
    replicate = (f"local simulator at {sim_url} (set REPLICATE_API_TOKEN to use Replicate)"
                 if simulated else env.get("REPLICATE_API_BASE_URL", "https://api.replicate.com/v1"))
    cli = ".venv/bin/flask --app service reconcile   (another terminal, this directory"
    cli += f"; {flaskenv.name} has this run's settings)" if flaskenv else ")"
    return BANNER.format(base=base, replicate=replicate, public=env["PUBLIC_BASE_URL"],
                         database=redact(url), cli=cli)


def main() -> int:
    load_dotenv(ROOT / ".env")  # first: HOST, PORT and SIM_PORT there are the options' defaults
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--sim-port", type=int, default=int(os.environ.get("SIM_PORT", "8100")),
                        help="port of the local Replicate simulator (used without REPLICATE_API_TOKEN)")
    parser.add_argument("--flaskenv", type=Path, default=ROOT / ".flaskenv",
                        help="where to write the settings this run chose, for `flask` commands in "
                             "other terminals (default: .flaskenv in the checkout)")
    args = parser.parse_args()
    # A terminal is read by a person: text lines unless LOG_FORMAT says otherwise.
    os.environ.setdefault("LOG_FORMAT", "text")
    try:
        settings = Settings.from_env()
        logs.configure(settings.LOG_LEVEL, settings.LOG_FORMAT)
        problem = exposure.refusal(settings.as_dict(), (f"{args.host}:{args.port}",))
        if problem:  # before anything starts; gunicorn's own check would refuse it too
            raise ConfigError(problem)
        url = resolve_database_url(settings.DATABASE_URL, settings.DATA_DIR)
        with connect(url, autocommit=True) as conn:
            applied = migrations.migrate(conn, event_partitions=settings.EVENT_PARTITIONS)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("migrations: %s", ", ".join(applied) if applied else "up to date",
                extra={"action": "migrate"})
    env, simulated = replicate_env(args, dict(os.environ, DATABASE_URL=url,
                                              PROMETHEUS_MULTIPROC_DIR=metrics_dir(settings.DATA_DIR)))
    for port, flag in [(args.port, "--port")] + ([(args.sim_port, "--sim-port")] if simulated else []):
        if not port_free(args.host, port):
            print(f"error: port {port} on {args.host} is in use; stop what uses it or run "
                  f"./run.sh {flag} {port + 1}", file=sys.stderr)
            return 2

    wrote = write_flaskenv(args.flaskenv, dict(os.environ), env)
    try:
        return run(args, env, url, simulated, args.flaskenv if wrote else None)
    finally:
        if wrote:
            args.flaskenv.unlink(missing_ok=True)


def run(args: argparse.Namespace, env: dict[str, str], url: str, simulated: bool,
        flaskenv: Path | None) -> int:
    """Start the simulator (if used), the web app and the worker; wait for Ctrl-C or SIGTERM."""
    children = []
    if simulated:
        children.append(start_simulator(args.host, args.sim_port))
        if not wait_healthy(f"http://{args.host}:{args.sim_port}/_sim/health", 30):
            print("error: the local Replicate simulator did not start", file=sys.stderr)
            children[0].terminate()
            return 1
    children += [start_web(args.host, args.port, env), start_worker(env)]

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
    print(banner(base, url, env, simulated, f"http://{args.host}:{args.sim_port}/v1", flaskenv),
          flush=True)
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
