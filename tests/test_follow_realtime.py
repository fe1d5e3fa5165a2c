"""The follower through Supabase: supabase-py's auth, PostgREST and Realtime clients against a
local project (tests/realtime_server.py) whose database is laid out like Supabase's
(tests/supabase.py) and migrated unchanged. The jobs run for real (simulator, worker), and
what the follower hears are the realtime.messages rows our migrations' trigger writes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.realtime_server import ANON_KEY, SupabaseServer
from tests.stack import running_stack
from tests.test_follow import followed_from_the_start, followed_to_completion, follower, parsed

ALICE = ("alice@example.com", "alice-password", "6f1c3a0e-1d2b-4c5d-8e9f-0a1b2c3d4e5f")
BOB = ("bob@example.com", "bob-password", "0b7e6d5c-4a39-4281-9f0e-1d2c3b4a5968")


@pytest.fixture
def project(supabase_url: str) -> Iterator[SupabaseServer]:
    server = SupabaseServer(supabase_url)
    for email, password, user_id in (ALICE, BOB):
        server.add_user(email, password, user_id)
    yield server
    server.close()


@pytest.fixture
def stack(supabase_url: str, project: SupabaseServer):
    """The service on the project's database, taking users' tokens as Supabase issues them."""
    with running_stack(supabase_url, speed=5.0, SUPABASE_URL=project.url,
                       SUPABASE_JWT_SECRET=project.secret) as running:
        yield running


def env(project: SupabaseServer, **user: str) -> dict[str, str]:
    return {"SUPABASE_URL": project.url, "SUPABASE_ANON_KEY": ANON_KEY, **user}


def alices_job(stack, project: SupabaseServer, **body) -> str:
    token = project.token_for(ALICE[2], ALICE[0])
    response = requests.post(f"{stack.base_url}/api/jobs", headers={"Authorization": f"Bearer {token}"},
                             json={"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse"}, **body},
                             timeout=10)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_the_owner_follows_a_job_through_realtime_broadcasts(stack, project):
    job_id, run, stdout, stderr = followed_from_the_start(
        stack, lambda: alices_job(stack, project, count=2),
        env=env(project, SUPABASE_EMAIL=ALICE[0], SUPABASE_PASSWORD=ALICE[1]))
    assert run.returncode == 0, stderr
    lines = followed_to_completion(stdout, (2, 2, 2))
    statuses = [line[0] for line in lines]
    with stack.app.extensions["db_pool"].connection() as conn:
        urls = [o["url"] for o in conn.execute("SELECT outputs FROM jobs WHERE id = %s",
                                               (job_id,)).fetchone()["outputs"]]
        rows = conn.execute("SELECT payload FROM realtime.messages WHERE topic = %s ORDER BY id",
                            (f"job:{job_id}",)).fetchall()
    assert sorted(lines[-1][4]) == sorted(urls)
    # what was sent is the rows the trigger wrote, in order, from the moment the follower joined
    sent = [b["payload"]["payload"] for b in project.broadcasts]
    assert sent and sent == [r["payload"] for r in rows][-len(sent):]
    assert {b["topic"] for b in project.broadcasts} == {f"realtime:job:{job_id}"}
    # every line after the first was a change a broadcast announced
    announced = {r["record"]["status"] for r in sent}
    assert set(statuses[1:]) <= announced and sent[-1]["record"]["status"] == "completed"
    assert sent[-1]["operation"] == "UPDATE" and sent[-1]["table"] == "jobs"
    [join] = project.joins
    assert join["topic"] == f"realtime:job:{job_id}" and join["payload"]["config"]["private"] is True
    assert project.claims(join["payload"]["access_token"])["sub"] == ALICE[2]


def test_an_access_token_is_enough_and_an_ended_job_prints_once(stack, project):
    job_id = alices_job(stack, project)
    _wait_done(stack, job_id)
    run = follower(job_id, env=env(project, SUPABASE_ACCESS_TOKEN=project.token_for(ALICE[2])))
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr
    [(status, done, total, outputs, urls)] = parsed(stdout)
    assert (status, done, total, outputs, len(urls)) == ("completed", 1, 1, 1, 1)


def test_another_user_is_refused_not_left_waiting(stack, project):
    job_id = alices_job(stack, project)
    run = follower(job_id, env=env(project, SUPABASE_EMAIL=BOB[0], SUPABASE_PASSWORD=BOB[1]))
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 1 and stdout == ""
    assert f"Realtime refused the private channel job:{job_id}" in stderr
    assert "You do not have permissions to read from this Channel topic" in stderr
    assert "only the job's owner may follow it" in stderr


def test_sign_in_problems_are_one_clear_line(stack, project):
    job_id = str(uuid.uuid4())
    run = follower(job_id, env=env(project, SUPABASE_EMAIL=ALICE[0], SUPABASE_PASSWORD="wrong"))
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 1
    assert "Supabase refused the sign-in of alice@example.com: Invalid login credentials" in stderr
    run = follower(job_id, env=env(project))
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 1 and "set SUPABASE_ACCESS_TOKEN" in stderr
    run = follower(job_id, env=env(project, SUPABASE_ACCESS_TOKEN="not-a-token"))
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 1 and "Realtime refused the private channel" in stderr
    closed = {**env(project, SUPABASE_EMAIL=ALICE[0], SUPABASE_PASSWORD=ALICE[1]),
              "SUPABASE_URL": stack.base_url.rsplit(":", 1)[0] + ":9"}  # nothing listens there
    run = follower(job_id, env=closed)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 1 and "cannot reach Supabase Auth" in stderr and "Traceback" not in stderr


def _wait_done(stack, job_id: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with stack.app.extensions["db_pool"].connection() as conn:
            status = conn.execute("SELECT status FROM jobs WHERE id = %s", (job_id,)).fetchone()["status"]
        if status == "completed":
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not complete")
