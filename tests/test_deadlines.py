"""Job deadlines over real HTTP: cancel_after becomes Replicate's Cancel-After with the time
left, the simulator stops a prediction at it (aborted before it started, canceled while
running), and work still queued at the deadline is never sent. Each ends the job failed with
the reason 'deadline exceeded', in the API and in job_history."""

from __future__ import annotations

import time

import psycopg
import pytest
import requests
from psycopg.rows import dict_row

from scripts.replicate_sim import Timing
from service import replay
from service.cli import handlers
from service.worker import Worker
from tests.stack import running_stack

MODEL = "stability-ai/sdxl"


def history(db_url: str, job_id: str) -> dict:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return conn.execute("SELECT status, error, deadline FROM job_history WHERE id = %s",
                            (job_id,)).fetchone()


def seconds(header: str) -> float:
    return float(header[:-2]) / 1000 if header.endswith("ms") else float(header[:-1])


def test_cancel_after_reaches_replicate_as_the_time_left(db_url):
    with running_stack(db_url) as stack:
        job = stack.create_job(model=MODEL, input={"prompt": "a lighthouse"}, cancel_after="2m")
        done = stack.wait(job["id"], {"completed", "failed"})
        assert done["status"] == "completed"
        [prediction] = done["predictions"]
        sent = stack.sim.cancel_after[prediction["id"]]
        assert sent.endswith("s") and not sent.endswith("ms")  # whole seconds from 10 s up
        assert 110 <= seconds(sent) <= 120  # the time left when it was created, never more
        assert done["deadline"] is not None


def test_a_prediction_that_never_started_is_aborted_and_ends_the_job(db_url):
    # the model takes 30 s to start; the job has 2
    with running_stack(db_url, speed=1, timing=Timing(start_delay=30)) as stack:
        job = stack.create_job(model=MODEL, input={"prompt": "a lighthouse"}, cancel_after=2)
        done = stack.wait(job["id"], {"completed", "failed"}, seconds=20)
        [prediction] = done["predictions"]
        assert prediction["status"] == "aborted"
        assert seconds(stack.sim.cancel_after[prediction["id"]]) <= 2
        assert (done["status"], done["error"]) == ("failed", "deadline exceeded")
        assert history(db_url, job["id"])["error"] == "deadline exceeded"


def test_a_retry_of_a_job_its_deadline_stopped_gets_its_cancel_after_again(db_url):
    with running_stack(db_url, speed=1, timing=Timing(start_delay=30)) as stack:
        job = stack.create_job(model=MODEL, input={"prompt": "a lighthouse"}, cancel_after=2)
        first = stack.wait(job["id"], {"completed", "failed"}, seconds=20)
        assert (first["status"], first["error"]) == ("failed", "deadline exceeded")
        retried = requests.post(f"{stack.base_url}/api/jobs/{job['id']}/retry", timeout=10)
        assert retried.status_code == 202 and retried.json()["deadline"] > first["deadline"]
        again = stack.wait(job["id"], {"completed", "failed"}, seconds=20)
        # sent (not refused as past the first deadline) with about 2 s, and aborted again
        [new] = [p for p in again["predictions"] if not p["superseded"]]
        assert new["status"] == "aborted" and 0 < seconds(stack.sim.cancel_after[new["id"]]) <= 2
        assert (again["status"], again["error"], again["retries"]) == ("failed", "deadline exceeded", 1)
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        result = replay.replay(conn, check=True)
    assert result.differences == 0, [str(d) for d in result.samples]


def test_a_running_prediction_is_canceled_and_ends_the_job(db_url):
    # it starts at once and takes 50 s; the job has 2
    with running_stack(db_url, speed=1, timing=Timing(start_delay=0.05, step_seconds=1)) as stack:
        job = stack.create_job(model=MODEL, input={"prompt": "a lighthouse"}, cancel_after="2s")
        done = stack.wait(job["id"], {"completed", "failed"}, seconds=20)
        [prediction] = done["predictions"]
        assert prediction["status"] == "canceled" and prediction["started_at"] is not None
        assert (done["status"], done["error"]) == ("failed", "deadline exceeded")
        assert history(db_url, job["id"]) | {"deadline": None} == {
            "status": "failed", "error": "deadline exceeded", "deadline": None}


# At speed 1, so that the simulator's Cancel-After runs on the wall clock as the deadline
# does (it scales simulated seconds by its speed); a model that runs in about half a second.
FAST = Timing(start_delay=0.05, step_seconds=0.01, upload_seconds=0.01)


def test_a_second_step_past_the_deadline_is_not_sent(db_url):
    with running_stack(db_url, speed=1, timing=FAST, worker=False) as stack:
        job = stack.create_job(model="black-forest-labs/flux-schnell", input={"prompt": "a portrait"},
                               cancel_after=4, then={"model": "black-forest-labs/flux-kontext-pro", "input": {
                                   "prompt": "put it in the template", "input_image": "{{outputs[0]}}"}})
        deadline = time.monotonic() + 4
        stack.work()  # step 1's submission
        post_processing = Worker(stack.ctx, {"process_output": handlers()["process_output"]},
                                 poll_seconds=0.1)
        while stack.job(job["id"])["steps"][0]["processed"] == 0:  # step 1 finishes in time
            while post_processing.run_once():
                pass
            time.sleep(0.05)
            assert time.monotonic() < deadline, "step 1 did not finish in time for this test"
        time.sleep(deadline - time.monotonic() + 0.2)
        assert stack.work() == 1  # step 2's submission, queued, now past the deadline
        done = stack.job(job["id"])
        assert len(stack.sim.predictions) == 1  # step 2 never reached Replicate
        assert (done["status"], done["error"]) == ("failed", "deadline exceeded")
        step2 = [p for p in done["predictions"] if p["step"] == 2]
        assert [(p["status"], p["error"]) for p in step2] == [("failed", "deadline exceeded")]
        with psycopg.connect(db_url, row_factory=dict_row) as conn:
            result = replay.replay(conn, check=True)
        assert result.differences == 0, [str(d) for d in result.samples]


def test_a_submission_queued_past_the_deadline_is_not_sent(db_url):
    with running_stack(db_url, worker=False) as stack:
        job = stack.create_job(model=MODEL, input={"prompt": "a lighthouse"}, count=2, cancel_after=1)
        time.sleep(1.2)
        stack.work()
        done = stack.job(job["id"])
        assert stack.sim.predictions == {}
        assert (done["status"], done["error"]) == ("failed", "deadline exceeded")
        assert done["progress"] == {"total": 2, "succeeded": 0, "failed": 2, "processed": 0}


def test_job_cancel_after_is_the_default_deadline(db_url):
    with running_stack(db_url, worker=False, JOB_CANCEL_AFTER="5m") as stack:
        job = stack.create_job(model=MODEL, input={"prompt": "a lighthouse"})
        own = stack.create_job(model=MODEL, input={"prompt": "a lighthouse"}, cancel_after=60)
        with psycopg.connect(db_url, row_factory=dict_row) as conn:
            rows = {r["stream"]: r["data"]["cancel_after"] for r in conn.execute(
                "SELECT stream, data FROM events WHERE type = 'job.created'")}
            spans = {str(r["id"]): r["span"] for r in conn.execute(
                "SELECT id, extract(epoch FROM deadline - created_at) AS span FROM jobs")}
        assert rows == {job["id"]: 300, own["id"]: 60}
        assert spans == {job["id"]: 300, own["id"]: 60}


@pytest.mark.parametrize("value, message", [
    ("soon", 'must be seconds (a number) or a duration like "90s"'),
    ("5 m", "must be seconds"),
    (0, "must be from 1 second"),
    (-5, "must be from 1 second"),
    (10 ** 9, "a year"),
    (True, "must be seconds"),
    ([], "must be seconds"),
])
def test_a_bad_cancel_after_is_refused_and_records_nothing(client, conn, value, message):
    response = client.post("/api/jobs", json={"model": MODEL, "input": {"prompt": "x"},
                                              "cancel_after": value})
    assert response.status_code == 422
    body = response.get_json()
    assert body["error"] == "invalid_request" and message in body["fields"]["cancel_after"][0]
    assert conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == 0


def test_a_bad_job_cancel_after_stops_startup(db_url):
    from service import create_app
    from service.errors import ConfigError

    with pytest.raises(ConfigError, match="JOB_CANCEL_AFTER must be"):
        create_app({"TESTING": True, "DATABASE_URL": db_url, "JOB_CANCEL_AFTER": "tomorrow"})


def test_a_job_retried_twice_has_its_cancel_after_from_the_latest_retry(conn):
    """Each retry gives the job its cancel_after again, counted from the retry: the second
    must not add the first retry's extension again (the live fold did, and a replay then
    disagreed with it)."""
    from service import events
    from tests.conftest import new_job_id
    from tests.workload import create_job

    job = new_job_id()
    created = create_job(conn, job, cancel_after="3600")
    retried = [events.append(conn, key=f"retried:{job}:{n}", stream=job, type="job.retried",
                             data={"predictions": []}) for n in (1, 2)]
    times = conn.execute("SELECT recorded_at FROM events WHERE stream = %s", (job,)).fetchall()
    latest = max(t["recorded_at"] for t in times)
    assert created and retried and latest > min(t["recorded_at"] for t in times)
    deadline = conn.execute("SELECT deadline - %s AS left FROM jobs WHERE id = %s", (latest, job)).fetchone()
    assert deadline["left"].total_seconds() == 3600
    assert replay.replay(conn, check=True).differences == 0
