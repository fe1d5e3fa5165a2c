"""./run.sh's runner (scripts/dev.py) and a second terminal: while it runs, `flask --app service ...`
elsewhere reaches the same local simulator with no hand-set variable, through the .flaskenv it
writes; variables the user set always win; the file goes when the run stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import requests
from flask.cli import load_dotenv

from scripts.dev import FLASKENV_HEADER, banner, write_flaskenv
from tests.test_cli import assert_one_line_error, cli_env, flask
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
CHOSEN = {"PUBLIC_BASE_URL": "http://127.0.0.1:8000", "REPLICATE_API_BASE_URL": "http://127.0.0.1:8100/v1",
          "REPLICATE_API_TOKEN": "local-simulator", "REPLICATE_WEBHOOK_SECRET": "",
          "OUTPUT_ALLOWED_HOSTS": "127.0.0.1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_file_holds_what_the_run_chose_and_the_users_settings_win(tmp_path, monkeypatch):
    path = tmp_path / ".flaskenv"
    given = {"PUBLIC_BASE_URL": "http://127.0.0.1:8000", "HOME": "/root"}
    assert write_flaskenv(path, given, {**given, **CHOSEN, "DATABASE_URL": "postgresql://u:pw@h/db"})
    text = path.read_text()
    assert text.startswith(FLASKENV_HEADER)
    assert "PUBLIC_BASE_URL" not in text  # the user gave it: theirs, not the file's
    assert "DATABASE_URL" not in text and "pw" not in text  # the CLI finds the database itself
    for name in ("REPLICATE_API_BASE_URL", "REPLICATE_API_TOKEN", "REPLICATE_WEBHOOK_SECRET"):
        monkeypatch.setenv(name, "")  # so that monkeypatch removes what the loader sets
        monkeypatch.delenv(name)
    monkeypatch.setenv("OUTPUT_ALLOWED_HOSTS", "mine.example")
    monkeypatch.chdir(tmp_path)
    load_dotenv()  # what the flask command does before it builds the app
    assert os.environ["REPLICATE_API_BASE_URL"] == "http://127.0.0.1:8100/v1"
    assert os.environ["REPLICATE_API_TOKEN"] == "local-simulator"
    assert os.environ["OUTPUT_ALLOWED_HOSTS"] == "mine.example"


def test_someone_elses_flaskenv_is_left_alone(tmp_path):
    path = tmp_path / ".flaskenv"
    path.write_text("FLASK_DEBUG=1\n")
    assert not write_flaskenv(path, {}, CHOSEN)
    assert path.read_text() == "FLASK_DEBUG=1\n"
    ours = tmp_path / "ours"
    ours.write_text(FLASKENV_HEADER + "REPLICATE_API_TOKEN=\"stale\"\n")
    assert write_flaskenv(ours, {}, CHOSEN) and "stale" not in ours.read_text()


def test_a_flask_command_in_another_terminal_reaches_the_runs_simulator(db_url, tmp_path):
    port, sim_port, flaskenv = free_port(), free_port(), tmp_path / ".flaskenv"
    env = cli_env(DATABASE_URL=db_url, DATA_DIR=str(tmp_path / "data"), WEB_CONCURRENCY="1")
    other = cli_env(DATABASE_URL=db_url, PYTHONPATH=str(ROOT))  # another terminal: reads .flaskenv
    other.pop("FLASK_SKIP_DOTENV")
    run = subprocess.Popen([sys.executable, "scripts/dev.py", "--port", str(port), "--sim-port",
                            str(sim_port), "--flaskenv", str(flaskenv)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_for("the run's web app", lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 90)
        settings = dict(line.split("=", 1) for line in flaskenv.read_text().splitlines()
                        if not line.startswith("#"))
        assert settings["REPLICATE_API_BASE_URL"] == f'"http://127.0.0.1:{sim_port}/v1"'
        assert _answers(f"http://127.0.0.1:{sim_port}/_sim/health")
        # Another terminal, in the directory of .flaskenv: no REPLICATE_* variable set by hand.
        reconciled = flask("reconcile", env=other, cwd=tmp_path)
        assert reconciled.returncode == 0, reconciled.stderr
        assert reconciled.stdout == "nothing to do: no quiet job, no failed submission, no stalled job\n"
        # A variable the user set wins over the file.
        mine = flask("reconcile", env=dict(other, REPLICATE_API_BASE_URL="ftp://elsewhere"), cwd=tmp_path)
        assert_one_line_error(mine, "REPLICATE_API_BASE_URL", "ftp://elsewhere")
    finally:
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
    assert run.returncode == 0
    assert "(another terminal, this directory; .flaskenv has this run's settings)" in out
    assert not flaskenv.exists()
    assert_one_line_error(flask("reconcile", env=other, cwd=tmp_path), "REPLICATE_API_TOKEN")


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _curl(text: str) -> list[str]:
    """The first `curl ... /api/jobs` command in text, its lines stripped of indentation."""
    lines = [line.strip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("curl -s -X POST"))
    end = next(i for i in range(start, len(lines)) if lines[i].endswith("'"))
    return lines[start:end + 1]


def test_the_banner_says_what_the_readme_and_the_sql_guide_say():
    shown = banner("http://127.0.0.1:8000", "postgresql://postgres:@/postgres?host=/path/to/repo/.data/postgres",
                   {"PUBLIC_BASE_URL": "http://127.0.0.1:8000"}, True, "http://127.0.0.1:8100/v1",
                   ROOT / ".flaskenv")
    readme = (ROOT / "README.md").read_text()
    assert _curl(shown) == _curl(readme)
    assert '"input": {"prompt": "a lighthouse", "aspect_ratio": "3:4"}' in _curl(shown)[-1]
    sql_line = next(line for line in shown.splitlines() if line.strip().startswith("SQL:"))
    assert sql_line in (ROOT / "docs" / "sql.md").read_text().splitlines()
    assert "Database:" not in (ROOT / "docs" / "sql.md").read_text()
