"""What a deploy runs: the Procfile under honcho (release migrates, web answers /readyz, the
worker takes a job through the Replicate simulator to the end) and the Dockerfile, linted
with hadolint and its copied files shown to be enough. The image is not built here: no base
image can be pulled on these machines."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import requests

from scripts.replicate_sim import start_simulator
from tests.conftest import with_database
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HADOLINT = [str(BIN / "hadolint"), "--failure-threshold", "style", "--disable-ignore-pragma"]


@pytest.fixture
def empty_db(server_url):
    """A database with nothing in it, as a new deploy meets it."""
    name = f"rjs_deploy_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    yield with_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def platform_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """A platform's environment: its PATH with the installed packages, these settings, and
    nothing of the checkout's (.env, .flaskenv)."""
    keep = {"HOME", "LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"}
    env = {k: v for k, v in os.environ.items() if k in keep}
    return dict(env, PATH=f"{BIN}:{os.environ['PATH']}", FLASK_SKIP_DOTENV="1",
                DATA_DIR=str(tmp_path / "data"), **settings)


def honcho(*args: str) -> list[str]:
    return [str(BIN / "honcho"), "-f", str(ROOT / "Procfile"), "-d", str(ROOT), *args]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_procfile_migrates_then_serves_and_its_worker_completes_a_job(empty_db, tmp_path):
    no_env_file = tmp_path / "empty.env"
    no_env_file.write_text("")
    sim = start_simulator(speed=20)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = platform_env(tmp_path, DATABASE_URL=empty_db, HOST="127.0.0.1", WEB_CONCURRENCY="1",
                       REPLICATE_API_BASE_URL=sim.api_url, REPLICATE_API_TOKEN="procfile-test",
                       PUBLIC_BASE_URL=base, OUTPUT_ALLOWED_HOSTS="127.0.0.1", WORKER_POLL_SECONDS="1")
    try:
        release = subprocess.run(honcho("start", "-e", str(no_env_file), "release"), env=env,
                                 capture_output=True, text=True, timeout=120)
        assert release.returncode == 0, release.stdout + release.stderr
        assert re.search(r"release\.1 +\| applied 001_", release.stdout), release.stdout
        log = (tmp_path / "honcho.log").open("w")
        running = subprocess.Popen(honcho("start", "-e", str(no_env_file), "-p", str(port), "web", "worker"),
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for("/readyz", lambda: _status(f"{base}/readyz") == 200, 90)
            spec = {"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse", "aspect_ratio": "3:4"}}
            job = requests.post(f"{base}/api/jobs", json=spec, timeout=10).json()
            wait_for("the worker to finish the job", lambda: _job(base, job["id"])["status"] == "completed",
                     90)
            done = _job(base, job["id"])
            assert done["predictions"][0]["status"] == "succeeded"
            assert [(o["width"], o["height"]) for o in done["outputs"]] == [(1080, 1440)]
            events = requests.get(f"{base}/api/jobs/{job['id']}/events", timeout=10).json()["events"]
            assert {"prediction.submitted", "output.processed"} <= {e["type"] for e in events}
        finally:
            running.send_signal(signal.SIGTERM)  # honcho passes it on to web and worker
            running.wait(timeout=60)
            log.close()
        shown = (tmp_path / "honcho.log").read_text()
        assert re.search(r"web\.1 +\| .*Listening at: http://127\.0\.0\.1:" + str(port), shown), shown
        assert re.search(r"worker\.1 +\| .*worker started", shown), shown
    finally:
        sim.stop()


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return 0


def _job(base: str, job_id: str) -> dict:
    return requests.get(f"{base}/api/jobs/{job_id}", timeout=10).json()


def test_the_procfile_names_the_three_processes_of_the_docs():
    lines = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line)
    assert lines == {"release": "flask --app service migrate",
                     "web": 'HOST="${HOST:-0.0.0.0}" gunicorn -c gunicorn.conf.py wsgi:app',
                     "worker": "flask --app service worker"}
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    for command in lines.values():
        assert command in deploy, command


def test_the_dockerfile_passes_hadolint_at_its_strictest():
    result = subprocess.run([*HADOLINT, str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_careless_dockerfile(tmp_path):
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install flask\nCMD gunicorn wsgi:app\n")
    result = subprocess.run([*HADOLINT, str(careless)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):  # latest; unpinned; pip cache; shell CMD
        assert rule in result.stdout, (rule, result.stdout)


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_the_image_runs_as_a_user_listens_everywhere_and_installs_only_runtime_packages():
    text = dockerfile()
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.MULTILINE)
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    assert "HOST=0.0.0.0" in text and "ALLOW_OPEN" not in text
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs == ["pip install --no-cache-dir -r requirements.txt \\"], installs
    assert re.search(r'^CMD \["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"\]$', text, re.MULTILINE)


def test_what_the_image_copies_is_enough_to_migrate_and_load_the_app(empty_db, tmp_path):
    """Copy exactly what the Dockerfile's COPY lines name (through .dockerignore) into an
    empty directory, and run the release and the web app's import from there."""
    image = tmp_path / "app"
    image.mkdir()
    for sources, _ in re.findall(r"^COPY ((?:\S+ )+)(\S+)$", dockerfile(), re.MULTILINE):
        for source in sources.split():
            origin = ROOT / source.rstrip("/")
            if origin.is_dir():
                shutil.copytree(origin, image / source.rstrip("/"),
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(origin, image / source)
    assert sorted(p.name for p in image.iterdir()) == [
        "gunicorn.conf.py", "requirements.txt", "service", "sql", "wsgi.py"]
    env = dict(os.environ, DATABASE_URL=empty_db, FLASK_SKIP_DOTENV="1", DATA_DIR=str(tmp_path / "data"))
    env.pop("PYTHONPATH", None)
    migrated = subprocess.run([sys.executable, "-m", "flask", "--app", "service", "migrate"], cwd=image,
                              env=env, capture_output=True, text=True, timeout=120)
    assert migrated.returncode == 0 and migrated.stdout.startswith("applied 001_"), migrated.stderr
    loaded = subprocess.run([sys.executable, "-c", "import service, wsgi; print(service.__file__)"],
                            cwd=image, env=env, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == str(image / "service" / "__init__.py")


def test_the_build_context_leaves_secrets_and_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*"  # everything is left out but what is named after it
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    assert allowed == {"requirements.txt", "service", "sql", "wsgi.py", "gunicorn.conf.py"}

