"""The follower on the embedded default: `flask --app service follow` and scripts/follow_job.py
as a user runs them, following jobs the simulator really runs, over the service's own
Server-Sent Events stream (service/changes.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.stack import running_stack

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^\d\d:\d\d:\d\d (\w+) +(\d+)/(\d+) predictions, (\d+) outputs(?:  (.*))?$")
ORDER = ["pending", "queued", "running", "processing", "completed", "failed", "canceled"]


def follower(*args: str, env: dict[str, str] | None = None, flask: bool = False) -> subprocess.Popen:
    command = ([str(ROOT / ".venv/bin/flask"), "--app", "service", "follow"] if flask
               else [sys.executable, str(ROOT / "scripts/follow_job.py")])
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "API_KEYS"))}
    return subprocess.Popen([*command, *args], cwd=ROOT, env={**clean, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def followed_from_the_start(stack, create: Callable[[], str], *args: str, env: dict[str, str] | None = None,
                            flask: bool = False) -> tuple[str, subprocess.Popen, str, str]:
    """Create a job (create() gives its id) and follow it until the follower exits: the job's
    id, the follower, its stdout and stderr. The worker is held until the follower has
    printed the job as created: on a busy machine a new Python's start-up took longer than
    the simulator's whole job, and the follower saw only its end."""
    with stack.held():
        job_id = create()
        run = follower(job_id, *args, env=env, flask=flask)
        first = run.stdout.readline()  # the follower's lines are flushed as they come (click.echo)
    stdout, stderr = run.communicate(timeout=90)
    return job_id, run, first + stdout, stderr


def parsed(stdout: str) -> list[tuple[str, int, int, int, list[str]]]:
    lines = []
    for line in stdout.splitlines():
        match = LINE.match(line)
        assert match, f"not a follower line: {line!r}"
        status, done, total, outputs, urls = match.groups()
        lines.append((status, int(done), int(total), int(outputs), (urls or "").split()))
    return lines


def followed_to_completion(stdout: str, counts: tuple[int, int, int]) -> list[tuple]:
    """The follower's lines, checked to go forward only and to end completed with `counts`
    (done, total, outputs); several lines, so it heard the changes, not just the end."""
    lines = parsed(stdout)
    statuses = [line[0] for line in lines]
    assert statuses[-1] == "completed" and len(lines) >= 3, stdout
    assert [ORDER.index(s) for s in statuses] == sorted(ORDER.index(s) for s in statuses)
    assert lines[-1][1:4] == counts
    return lines


def test_the_follower_prints_each_change_until_the_job_completes(db_url):
    with running_stack(db_url, speed=5.0) as stack:
        job_id, run, stdout, stderr = followed_from_the_start(
            stack, lambda: stack.create_job(model="stability-ai/sdxl", input={"prompt": "a lighthouse"},
                                            count=2)["id"], "--url", stack.base_url)
        final = stack.job(job_id)
    assert run.returncode == 0, stderr
    lines = parsed(stdout)
    assert len(lines) >= 3 and len(set(lines_text := stdout.splitlines())) == len(lines_text)
    statuses = [line[0] for line in lines]
    assert statuses[-1] == "completed" and statuses.count("completed") == 1
    assert [ORDER.index(s) for s in statuses] == sorted(ORDER.index(s) for s in statuses)
    assert [line[1] for line in lines] == sorted(line[1] for line in lines)  # progress only grows
    assert lines[-1][1:4] == (2, 2, 2)
    assert sorted(lines[-1][4]) == sorted(o["url"] for o in final["outputs"])


def test_the_flask_command_follows_a_failing_job_and_says_so_in_its_exit_status(db_url):
    with running_stack(db_url, speed=5.0) as stack:
        job = stack.create_job(model="stability-ai/sdxl", input={"prompt": "please fail"})
        run = follower(job["id"], flask=True, env={"DATABASE_URL": db_url, "SERVICE_URL": stack.base_url})
        stdout, stderr = run.communicate(timeout=90)
    assert run.returncode == 3, stderr
    status, done, total, outputs, _ = parsed(stdout)[-1]
    assert (status, done, total, outputs) == ("failed", 1, 1, 0)
    assert "error:" in stdout.splitlines()[-1]


def test_a_job_that_does_not_exist_or_a_locked_service_is_a_clear_refusal(db_url):
    missing = str(uuid.uuid4())
    with running_stack(db_url, API_KEYS=("k-follow",)) as stack:
        run = follower(missing, "--url", stack.base_url, "--api-key", "k-follow")
        _, stderr = run.communicate(timeout=30)
        assert run.returncode == 1 and f"no job {missing}" in stderr
        run = follower(missing, "--url", stack.base_url)
        _, stderr = run.communicate(timeout=30)
        assert run.returncode == 1 and "wants an API key" in stderr
    run = follower(missing, "--url", stack.base_url)  # nothing listens there any more
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == 1 and "cannot reach the service" in stderr
    run = follower("not-a-job", "--url", stack.base_url)
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == 2 and "not a valid UUID" in stderr
