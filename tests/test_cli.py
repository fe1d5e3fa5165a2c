"""The `flask --app service ...` commands as a person runs them: a configuration problem is one
line naming the setting and exit status 2, never a traceback; plain output has no JSON log line
in it when a person reads it; counts are said in good English."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from service.cli import plural, reconciled
from tests.conftest import with_database

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [["migrate"], ["replay"], ["worker", "--once"], ["reconcile"]]


def cli_env(**settings: str) -> dict[str, str]:
    """The environment of a terminal with only these settings: nothing of the service's from
    this process, and no .flaskenv or .env of the checkout (a developer's ./run.sh may have
    written one)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REPLICATE_", "DATABASE_", "LOG_", "IMAGE_", "PUBLIC_", "FLASK_"))}
    return dict(env, FLASK_SKIP_DOTENV="1", **settings)


def flask(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flask", "--app", "service", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, no traceback, and the last line of stderr is click's `Error: ...` naming words."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.stderr
    for word in words:
        assert word in last, (word, last)
    return last


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_malformed_setting_is_one_line_for_every_command(command, db_url):
    result = flask(*command, env=cli_env(DATABASE_URL=db_url, IMAGE_JPEG_QUALITY="high"))
    assert_one_line_error(result, "IMAGE_JPEG_QUALITY", "'high'")
    result = flask(*command, env=cli_env(DATABASE_URL="mysql://db/x"))
    assert_one_line_error(result, "DATABASE_URL", "postgresql://")


def test_reconcile_without_a_replicate_token_names_the_setting(db_url):
    result = flask("reconcile", env=cli_env(DATABASE_URL=db_url))
    line = assert_one_line_error(result, "REPLICATE_API_TOKEN", "REPLICATE_API_BASE_URL", ".flaskenv")
    assert result.stdout == ""
    assert line.count("REPLICATE_API_TOKEN") == 1


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_an_unreachable_database_is_one_line(command):
    url = "postgresql://nobody@127.0.0.1:1/nothing"
    result = flask(*command, env=cli_env(DATABASE_URL=url, REPLICATE_API_TOKEN="t"))
    assert_one_line_error(result, "cannot connect", f"DATABASE_URL {url}", "Connection refused")


def test_the_embedded_server_in_a_shell_without_a_runtime_dir_prints_no_warning(tmp_path):
    """A root shell or a container has no XDG_RUNTIME_DIR: platformdirs warned at pgserver's
    import, and every command with the embedded server printed that warning."""
    env = {k: v for k, v in cli_env(DATA_DIR=str(tmp_path / "data")).items() if k != "XDG_RUNTIME_DIR"}
    result = flask("migrate", env=env)
    assert result.returncode == 0, result.stderr
    assert "embedded PostgreSQL" in result.stderr + result.stdout
    assert "Warning" not in result.stderr and "XDG_RUNTIME_DIR" not in result.stderr, result.stderr


def test_an_unmigrated_database_says_to_migrate_then_migrate_makes_it_work(server_url):
    name = f"rjs_cli_empty_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        env = cli_env(DATABASE_URL=with_database(server_url, name), REPLICATE_API_TOKEN="t",
                      REPLICATE_API_BASE_URL="http://127.0.0.1:1/v1")
        for command in (["replay"], ["reconcile"], ["worker", "--once"]):
            assert_one_line_error(flask(*command, env=env), "lacks", "migrations (first 001_",
                                  "run: flask --app service migrate")
        migrated = flask("migrate", env=env)
        assert migrated.returncode == 0 and migrated.stdout.startswith("applied 001_"), migrated.stderr
        replayed = flask("replay", env=env)
        assert replayed.returncode == 0, replayed.stderr
        assert replayed.stdout.splitlines()[0].startswith("0 events, 0 jobs, 0 predictions in ")
        again = flask("migrate", env=env).stdout.splitlines()
        assert again[0] == "database is up to date"
        assert again[1] in ("events' partitions: kept by the built-in upkeep",
                            "events' partitions: kept by pg_partman")  # as the server has it
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run a command with stdout and stderr on a pseudo-terminal, as a person sees it."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=follower,
                               stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # EIO: the command closed the terminal
            chunk = b""
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    return process.wait(timeout=60), seen.decode(errors="replace")


def test_on_a_terminal_log_lines_are_text_and_in_a_pipe_json(db_url):
    command = [sys.executable, "-m", "flask", "--app", "service", "replay"]
    code, screen = on_a_terminal(command, cli_env(DATABASE_URL=db_url))
    assert code == 0, screen
    lines = [line.strip() for line in screen.replace("\r", "\n").splitlines() if line.strip()]
    assert any("using PostgreSQL from DATABASE_URL" in line for line in lines), screen
    assert not [line for line in lines if line.startswith("{")], screen
    assert "the projection already matched the events" in lines[-1]
    # A platform reads stderr through a pipe: one JSON object per line there, by default.
    piped = flask("replay", env=cli_env(DATABASE_URL=db_url))
    logged = [json.loads(line) for line in piped.stderr.splitlines() if line.startswith("{")]
    assert [entry["action"] for entry in logged] == ["db_select"], piped.stderr
    # LOG_FORMAT set says it either way.
    code, screen = on_a_terminal(command, cli_env(DATABASE_URL=db_url, LOG_FORMAT="json"))
    assert '{"time": ' in screen and code == 0


def test_replay_counts_one_of_a_thing_in_the_singular(app, client):
    assert client.post("/api/jobs", json={"model": "a/b", "input": {}}).status_code == 201
    result = app.test_cli_runner().invoke(args=["replay"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("1 event, 1 job, 0 predictions in "), result.stdout
    assert "] jobs: 1 row, " in result.stderr
    assert " 1 rows" not in result.output and " 1 jobs" not in result.output


def test_a_full_replay_says_the_disk_it_needs_and_what_is_free(app, client):
    assert client.post("/api/jobs", json={"model": "a/b", "input": {}}).status_code == 201
    result = app.test_cli_runner().invoke(args=["replay"])
    assert result.exit_code == 0, result.output
    # the test servers run on this machine: their disk is visible
    assert "a full replay needs about " in result.stderr and " GB is free at /" in result.stderr


def test_a_full_replay_that_would_fill_the_disk_is_refused_in_one_line_and_changes_nothing(app, client):
    assert client.post("/api/jobs", json={"model": "a/b", "input": {}}).status_code == 201
    with psycopg.connect(app.config["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("DELETE FROM jobs")  # a replay would write it back
        runner = app.test_cli_runner()
        refused = runner.invoke(args=["replay", "--keep-free", "1000000000"])
        assert refused.exit_code == 1, refused.output
        assert "Traceback" not in refused.output
        message = refused.output.strip().splitlines()[-1]
        assert message.startswith("Error: a full replay needs about ") and "--keep-free" in message
        assert "--no-disk-check" in message
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
        # one job's replay copies one job: no check
        job = conn.execute("SELECT stream FROM events LIMIT 1").fetchone()[0]
        one = runner.invoke(args=["replay", "--job", job, "--keep-free", "1000000000"])
        assert one.exit_code == 0 and "needs about" not in one.output, one.output
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
        conn.execute("DELETE FROM jobs")
        forced = runner.invoke(args=["replay", "--keep-free", "1000000000", "--no-disk-check"])
        assert forced.exit_code == 0, forced.output
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1


def test_counts_and_the_reconcile_summary_read_as_english():
    assert [plural(n, "job") for n in (0, 1, 2, 1000)] == ["0 jobs", "1 job", "2 jobs", "1,000 jobs"]
    assert reconciled({"polled": 1, "unchanged": 0, "poll_failed": 2, "resubmitted": 1}) == (
        "1 prediction polled, changed; 2 predictions could not be polled; 1 submission retried")
    assert reconciled({"resubmitted": 0}) == \
        "nothing to do: no quiet job, no failed submission, no stalled job"


def test_reconcile_says_what_it_did(app):
    app.config.update(REPLICATE_API_TOKEN="t", REPLICATE_API_BASE_URL="http://127.0.0.1:1/v1")
    result = app.test_cli_runner().invoke(args=["reconcile"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "nothing to do: no quiet job, no failed submission, no stalled job\n"
