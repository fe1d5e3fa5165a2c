"""Retrying a finished job's failed predictions: one job over the API, many with
`flask --app service retry`, against the simulator over real HTTP. A retry is a round
(job.retried) that supersedes the old predictions; asked twice, it submits each once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
import requests
from psycopg.rows import dict_row

from service import create_app, events, replay
from tests.conftest import new_job_id, payload
from tests.stack import running_stack
from tests.test_auth import ALICE, BOB, SECRET, bearer, hs256

FAILING = {"fail": True, "fail_rate": 1.0}


def stream(db_url: str, job_id: str) -> list[dict]:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return conn.execute("SELECT position, type, data FROM events WHERE stream = %s ORDER BY position",
                            (job_id,)).fetchall()


def replay_differences(db_url: str) -> list[str]:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        result = replay.replay(conn, check=True)
    return [str(d) for d in result.samples] if result.differences else []


def test_a_retry_submits_the_failed_predictions_again_once(db_url):
    with running_stack(db_url, faults=FAILING) as stack:
        job = stack.create_job(model="stability-ai/sdxl", input={"prompt": "a lighthouse"}, count=2)
        failed = stack.wait(job["id"], {"completed", "failed"})
        assert failed["status"] == "failed" and failed["progress"]["failed"] == 2
        first = {p["id"] for p in failed["predictions"]}
        stack.sim.set_faults({"fail": False})

        url = f"{stack.base_url}/api/jobs/{job['id']}/retry"
        answers = [requests.post(url, timeout=10) for _ in range(2)]
        assert answers[0].status_code == 202
        assert answers[0].json()["status"] in ("pending", "queued", "running")
        assert answers[0].json()["retries"] == 1
        # asked again: the round still runs (200, nothing submitted) or is over (409, nothing to retry)
        assert answers[1].status_code in (200, 409), answers[1].text

        done = stack.wait(job["id"], {"completed", "failed"})
        assert done["status"] == "completed" and done["error"] is None
        assert done["progress"] == {"total": 2, "succeeded": 2, "failed": 0, "processed": 2}
        assert len(stack.sim.predictions) == 4  # each failed prediction sent again once
        superseded = {p["id"] for p in done["predictions"] if p["superseded"]}
        assert superseded == first and len(done["predictions"]) == 4  # the old ones stay
        again = requests.post(url, timeout=10)
        assert again.status_code == 409 and again.json()["error"] == "not_retryable"
        assert len(stack.sim.predictions) == 4

        shown = requests.get(f"{stack.base_url}/api/jobs/{job['id']}/events", timeout=10).json()["events"]
        assert [e["position"] for e in shown] == [e["position"] for e in stream(db_url, job["id"])]
        rounds = [(e["type"], e["data"].get("retry", 0)) for e in shown
                  if e["type"] in ("job.created", "prediction.submitted", "job.retried")]
        assert rounds == [("job.created", 0), ("prediction.submitted", 0), ("prediction.submitted", 0),
                          ("job.retried", 1), ("prediction.submitted", 1), ("prediction.submitted", 1)]
        with psycopg.connect(db_url, row_factory=dict_row) as conn:
            summary = conn.execute("SELECT summary FROM job_timeline WHERE stream = %s "
                                   "AND type = 'job.retried'", (job["id"],)).fetchone()["summary"]
        assert summary == "retry 1: 2 predictions submitted again"
    assert replay_differences(db_url) == []


def test_a_running_job_or_a_canceled_one_is_not_retried(db_url):
    with running_stack(db_url, worker=False) as stack:
        job = stack.create_job(model="stability-ai/sdxl", input={"prompt": "a lighthouse"})
        answer = requests.post(f"{stack.base_url}/api/jobs/{job['id']}/retry", timeout=10)
        assert answer.status_code == 409 and "has not finished" in answer.json()["message"]
        requests.post(f"{stack.base_url}/api/jobs/{job['id']}/cancel", timeout=10)
        answer = requests.post(f"{stack.base_url}/api/jobs/{job['id']}/retry", timeout=10)
        assert answer.status_code == 409 and "was canceled" in answer.json()["message"]
        missing = requests.post(f"{stack.base_url}/api/jobs/{new_job_id()}/retry", timeout=10)
        assert missing.status_code == 404
        assert [e["type"] for e in stream(db_url, job["id"])] == ["job.created", "job.canceled"]


def settle(stack, job_ids: list[str], statuses: set[str], seconds: float = 30) -> None:
    """Run the worker by hand until every job is in one of the statuses."""
    deadline = time.monotonic() + seconds
    while {stack.job(j)["status"] for j in job_ids} - statuses:
        stack.work()
        time.sleep(0.1)
        assert time.monotonic() < deadline, [stack.job(j) for j in job_ids]


def test_bulk_retry_by_filter_run_twice_submits_each_failed_prediction_once(db_url):
    with running_stack(db_url, faults=FAILING, worker=False) as stack:
        sdxl = [stack.create_job(model="stability-ai/sdxl", input={"prompt": "a lighthouse"}, count=2)["id"]
                for _ in range(2)]
        flux = stack.create_job(model="black-forest-labs/flux-schnell", input={"prompt": "a cat"})["id"]
        settle(stack, [*sdxl, flux], {"failed"})
        stack.sim.set_faults({"fail": False})
        cli = stack.app.test_cli_runner()

        dry = cli.invoke(args=["retry", "--status", "failed", "--model", "stability-ai/sdxl", "--dry-run"])
        assert dry.exit_code == 0, dry.output
        assert dry.output.startswith("2 jobs would be retried") and flux not in dry.output
        unknown = cli.invoke(args=["retry", "--status", "failed", "--error", "no such error"])
        assert unknown.output.strip() == "no job matches: nothing retried"
        assert len(stack.sim.predictions) == 5

        first = cli.invoke(args=["retry", "--status", "failed", "--model", "stability-ai/sdxl",
                                 "--error", "CUDA error", "--since", "1h"])
        assert first.exit_code == 0, first.output
        assert "retried 2 jobs (4 predictions submitted again)" in first.output
        second = cli.invoke(args=["retry", "--status", "failed", "--model", "stability-ai/sdxl"])
        assert second.exit_code == 0 and second.output.strip() == "no job matches: nothing retried"

        settle(stack, sdxl, {"completed"})
        assert len(stack.sim.predictions) == 5 + 4
        assert stack.job(flux)["status"] == "failed"  # not matched by --model
        third = cli.invoke(args=["retry", "--status", "failed", "--model", "stability-ai/sdxl"])
        assert third.output.strip() == "no job matches: nothing retried"
        assert len(stack.sim.predictions) == 9
    assert replay_differences(db_url) == []


def test_bulk_retry_refuses_a_bad_since_in_one_line(app):
    result = app.test_cli_runner().invoke(args=["retry", "--status", "failed", "--since", "yesterday"])
    assert result.exit_code == 2
    assert "--since" in result.output and "Traceback" not in result.output


@pytest.fixture
def api(db_url: str) -> Iterator:
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "API_KEYS": ("k1",),
                      "SUPABASE_JWT_SECRET": SECRET})
    yield app.test_client()
    app.extensions["db_pool"].close()


def test_only_the_owner_or_an_api_key_may_retry(api, conn):
    created = api.post("/api/jobs", json={"model": "stability-ai/sdxl", "input": {"prompt": "x"}},
                       headers=bearer(hs256(ALICE)))
    job = created.get_json()["id"]
    failed = payload("failed_flux11pro_nsfw_with_traceback_logs") | {"id": "p-failed"}
    events.append(conn, key=f"submitted:{job}:1:0", stream=job, type="prediction.submitted",
                  data={"step": 1, "index": 0, "prediction": {**failed, "status": "starting"}})
    events.append(conn, key="msg-failed", stream=job, type="replicate.webhook", data=failed,
                  metadata={"query": {"job": job, "step": "1", "index": "0"}})
    conn.commit()
    assert api.get(f"/api/jobs/{job}", headers=bearer("k1")).get_json()["status"] == "failed"

    other = api.post(f"/api/jobs/{job}/retry", headers=bearer(hs256(BOB)))
    assert other.status_code == 404  # another user's job does not exist for them
    assert api.post(f"/api/jobs/{job}/retry").status_code == 401
    mine = api.post(f"/api/jobs/{job}/retry", headers=bearer(hs256(ALICE)))
    assert mine.status_code == 202 and mine.get_json()["retries"] == 1
    by_key = api.post(f"/api/jobs/{job}/retry", headers=bearer("k1"))
    assert by_key.status_code == 200 and by_key.get_json()["retries"] == 1  # the round runs: nothing new
    tasks = conn.execute("SELECT task_key, payload FROM tasks WHERE kind = 'submit_prediction' "
                         "ORDER BY id").fetchall()
    assert [(t["task_key"], t["payload"]) for t in tasks] == [
        (f"submit:{job}:1:0", {"step": 1, "index": 0}),
        (f"submit:{job}:1:0:retry1", {"step": 1, "index": 0, "retry": 1})]
