"""Two-step jobs (`then`) end to end over real HTTP with the simulator: a refused second
step ends the job as a refused first step does, and the counts add up in the API, the
dashboard's API and job_history; and the reconciler ends a job that waits for nothing."""

from __future__ import annotations

import time

import pytest
import requests

from service import create_app, events
from service.cli import worker_context
from service.commands import retry_job
from service.reconciler import reconcile
from service.replay import replay
from tests.conftest import new_job_id
from tests.stack import running_stack
from tests.test_metrics import scrape, value

PORTRAIT = {"model": "black-forest-labs/flux-schnell", "input": {"prompt": "a portrait"},
            "aspect_ratio": "9:16"}


def replay_differences(stack) -> int:
    with stack.app.extensions["db_pool"].connection() as conn:
        return replay(conn, check=True).differences


def history(stack, job_id: str) -> dict:
    with stack.app.extensions["db_pool"].connection() as conn:
        return conn.execute("SELECT * FROM job_history WHERE id = %s", (job_id,)).fetchone()


@pytest.mark.parametrize("then, refusal", [
    ({"model": "nobody/no-such-model", "input": {"prompt": "x"}}, "404"),
    ({"model": "black-forest-labs/flux-kontext-pro",
      "input": {"prompt": "into the template", "input_image": "{{outputs[0]}}",
                "aspect_ratio": "match_input_image"}}, "Must be a ratio like 16:9"),
], ids=["404-unknown-model", "422-refused-input"])
def test_a_refused_second_step_fails_the_job_with_the_refusal(db_url, then, refusal):
    with running_stack(db_url) as stack:
        created = stack.create_job(**PORTRAIT, then=then)
        assert created["progress"]["total"] == 2  # both steps, before anything ran
        job = stack.wait(created["id"], {"completed", "failed"}, seconds=60)
        assert job["status"] == "failed", job
        refused = next(p for p in job["predictions"] if p["id"].startswith("unsubmitted-"))
        assert refused["id"] == f"unsubmitted-{job['id']}-2-0" and refused["step"] == 2
        assert refused["status"] == "failed" and refusal in refused["error"]
        assert job["error"] == refused["error"]
        assert job["progress"] == {"total": 2, "succeeded": 1, "failed": 1, "processed": 1}
        assert job["completed_at"] is not None
        row = history(stack, job["id"])
        assert (row["status"], row["error"]) == ("failed", job["error"])
        counted = (row["predictions_expected"], row["predictions_succeeded"], row["predictions_failed"])
        assert counted == (2, 1, 1)
        assert replay_differences(stack) == 0


def test_a_two_step_jobs_counts_agree_and_its_outputs_say_their_step(db_url):
    with running_stack(db_url) as stack:
        created = stack.create_job(**PORTRAIT, count=2, then={
            "model": "black-forest-labs/flux-kontext-pro",
            "input": {"prompt": "merge", "input_image": "{{outputs[1]}}"}})
        job = stack.wait(created["id"], {"completed", "failed"}, seconds=60)
        assert job["status"] == "completed", job
        assert job["progress"] == {"total": 3, "succeeded": 3, "failed": 0, "processed": 3}
        assert sorted((o["step"], o["index"]) for o in job["outputs"]) == [(1, 0), (1, 0), (2, 0)]
        second = next(p for p in job["predictions"] if p["step"] == 2)
        assert [o["prediction_id"] for o in job["outputs"] if o["step"] == 2] == [second["id"]]
        listed = requests.get(f"{stack.base_url}/api/jobs", timeout=10).json()["jobs"]
        assert [j["progress"] for j in listed if j["id"] == job["id"]] == [job["progress"]]
        shown = requests.get(f"{stack.base_url}/api/dashboard/jobs/{job['id']}/outputs", timeout=10).json()
        assert sorted(o["step"] for o in shown["outputs"]) == [1, 1, 2]
        row = history(stack, job["id"])
        assert (row["predictions_expected"], row["predictions_submitted"], row["predictions_succeeded"],
                row["outputs_expected"], row["outputs"]) == (3, 3, 3, 3, 3)
        assert replay_differences(stack) == 0


# --- the reconciler and a job that waits for nothing ------------------------------------------

@pytest.fixture
def app(db_url, monkeypatch):
    # /metrics shows this process's counters: not another process's files, which a test that
    # loads gunicorn.conf.py may have named in the environment
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "REPLICATE_API_TOKEN": "unused",
                      "REPLICATE_API_BASE_URL": "http://127.0.0.1:9/v1", "RECONCILE_AFTER_SECONDS": 1})
    yield app
    app.extensions["db_pool"].close()


def record(conn, job_id: str, key: str, type_: str, data: dict, **metadata) -> None:
    events.append(conn, key=key, stream=job_id, type=type_, data=data, metadata=metadata)


def step_one_done(conn, then: dict | None = None, processed: bool = True) -> str:
    """A job whose first step succeeded and, if `processed`, was post-processed, as the
    worker records it (its post-processing task done)."""
    job_id = new_job_id()
    record(conn, job_id, f"created:{job_id}", "job.created",
           {"model": "black-forest-labs/flux-schnell", "input": {"prompt": "x"}, "count": 1,
            **({"then": then} if then else {})})
    body = {"id": f"p-{job_id[-12:]}", "status": "starting", "model": "black-forest-labs/flux-schnell"}
    record(conn, job_id, f"submitted:{job_id}:1:0", "prediction.submitted",
           {"step": 1, "index": 0, "prediction": body})
    record(conn, job_id, f"polled:{body['id']}", "replicate.polled",
           {**body, "status": "succeeded", "output": ["https://example.com/a.png"]},
           query={"job": job_id, "step": "1"})
    if processed:
        record(conn, job_id, f"processed:{body['id']}:0", "output.processed",
               {"prediction_id": body["id"], "index": 0, "source_url": "https://example.com/a.png",
                "url": "/files/a.png", "width": 8, "height": 8, "bytes": 10})
        conn.execute("UPDATE tasks SET status = 'done' WHERE job_id = %s AND kind = 'process_output'",
                     (job_id,))
    return job_id


def reconciled(app) -> dict:
    time.sleep(1.1)  # RECONCILE_AFTER_SECONDS: the job must have gone quiet
    return reconcile(worker_context(app))


def job_row(conn, job_id: str) -> dict:
    return conn.execute("SELECT status, error, predictions_expected, predictions_failed FROM jobs "
                        "WHERE id = %s", (job_id,)).fetchone()


def test_a_job_whose_second_submission_was_lost_is_ended_by_the_reconciler(app):
    client = app.test_client()
    before = scrape(client)
    with app.extensions["db_pool"].connection() as conn:
        job_id = step_one_done(conn, then={"model": "black-forest-labs/flux-kontext-pro", "input": {}})
        lost = conn.execute("DELETE FROM tasks WHERE job_id = %s AND kind = 'submit_prediction' "
                            "RETURNING payload", (job_id,)).fetchall()
        assert [t["payload"] for t in lost] == [{"step": 2, "index": 0}]  # the task the fold enqueued
        assert job_row(conn, job_id)["status"] == "processing"
    assert reconciled(app)["stalled"] == 1
    with app.extensions["db_pool"].connection() as conn:
        row = job_row(conn, job_id)
        assert row["status"] == "failed" and row["predictions_failed"] == 1
        assert row["error"] == ("step 2's prediction 1 was never submitted: "
                                "the reconciler found nothing running or queued for it")
        step = conn.execute("SELECT step FROM predictions WHERE id = %s",
                            (f"unsubmitted-{job_id}-2-0",)).fetchone()["step"]
        assert step == 2
        assert replay(conn, check=True).differences == 0
    after = scrape(client)
    assert value(after, "rjs_stalled_jobs_total", outcome="ended") \
        - value(before, "rjs_stalled_jobs_total", outcome="ended") == 1
    assert reconciled(app)["stalled"] == 0  # ended: not found again


def test_a_job_whose_output_task_was_lost_and_one_never_submitted_are_ended(app):
    with app.extensions["db_pool"].connection() as conn:
        never = new_job_id()
        record(conn, never, f"created:{never}", "job.created", {"model": "a/b", "input": {}, "count": 2})
        job_id = step_one_done(conn, processed=False)
        lost = conn.execute("DELETE FROM tasks WHERE job_id = %s RETURNING kind", (job_id,)).fetchall()
        assert [t["kind"] for t in lost] == ["process_output"]
        assert job_row(conn, job_id)["status"] == "processing"
    assert reconciled(app)["stalled"] == 2
    with app.extensions["db_pool"].connection() as conn:
        assert job_row(conn, never) == {
            "status": "failed", "predictions_expected": 2, "predictions_failed": 2,
            "error": "step 1's prediction 1 was never submitted: "
                     "the reconciler found nothing running or queued for it"}
        row = job_row(conn, job_id)
        assert row["status"] == "failed"
        assert row["error"] == "never post-processed: the reconciler found nothing running or queued for it"


def test_a_job_stuck_by_the_old_rules_is_ended_with_its_refusal(app):
    """A database folded before the fix holds a refused second step counted in no step (step
    NULL) and the job left processing: the reconciler records the refusal again, with its step."""
    with app.extensions["db_pool"].connection() as conn:
        job_id = step_one_done(conn, then={"model": "nobody/none", "input": {}})
        conn.execute("DELETE FROM tasks WHERE job_id = %s AND kind = 'submit_prediction'", (job_id,))
        record(conn, job_id, f"submit_failed:{job_id}:2:0:0", "prediction.submit_failed",
               {"step": 2, "index": 0, "error": "404 not found", "final": True, "round": 0,
                "prediction_id": f"unsubmitted-{job_id}-2-0"})
        assert job_row(conn, job_id)["status"] == "failed"  # today's rules
        conn.execute("UPDATE predictions SET step = NULL WHERE id = %s", (f"unsubmitted-{job_id}-2-0",))
        conn.execute("UPDATE jobs SET status = 'processing', error = NULL, completed_at = NULL WHERE id = %s",
                     (job_id,))
    assert reconciled(app)["stalled"] == 1
    with app.extensions["db_pool"].connection() as conn:
        assert job_row(conn, job_id)["status"] == "failed"
        assert job_row(conn, job_id)["error"] == "404 not found"
        assert replay(conn, check=True).differences == 0


def test_a_retried_job_whose_new_submission_was_lost_is_ended_by_the_reconciler(app):
    """The retry round's slot is open though the prediction it superseded filled it in round
    0: the reconciler records the refusal in the round the job is in, for the slot that round
    submitted again (the second; the first kept its image), and the job ends."""
    with app.extensions["db_pool"].connection() as conn:
        job_id = new_job_id()
        record(conn, job_id, f"created:{job_id}", "job.created",
               {"model": "black-forest-labs/flux-schnell", "input": {"prompt": "x"}, "count": 2})
        ids = [f"p{n}-{job_id[-12:]}" for n in range(2)]
        for n, (pid, status) in enumerate(zip(ids, ("succeeded", "failed"), strict=True)):
            body = {"id": pid, "status": "starting", "model": "black-forest-labs/flux-schnell"}
            record(conn, job_id, f"submitted:{job_id}:1:{n}", "prediction.submitted",
                   {"step": 1, "index": n, "prediction": body})
            record(conn, job_id, f"polled:{pid}", "replicate.polled",
                   {**body, "status": status, "output": ["https://example.com/a.png"]}
                   if status == "succeeded" else {**body, "status": status, "error": "NSFW"},
                   query={"job": job_id, "step": "1"})
        record(conn, job_id, f"processed:{ids[0]}:0", "output.processed",
               {"prediction_id": ids[0], "index": 0, "source_url": "https://example.com/a.png",
                "url": "/files/a.png", "width": 8, "height": 8, "bytes": 10})
        conn.execute("UPDATE tasks SET status = 'done' WHERE job_id = %s AND kind = 'process_output'",
                     (job_id,))
        assert job_row(conn, job_id)["status"] == "completed"  # one image of two
        assert retry_job(conn, job_id) == (1, [ids[1]])
        lost = conn.execute("DELETE FROM tasks WHERE job_id = %s AND kind = 'submit_prediction' "
                            "RETURNING payload", (job_id,)).fetchall()
        assert [t["payload"] for t in lost] == [{"step": 1, "index": 1, "retry": 1}]
        assert job_row(conn, job_id)["status"] not in ("completed", "failed")
    assert reconciled(app)["stalled"] == 1
    with app.extensions["db_pool"].connection() as conn:
        assert job_row(conn, job_id) == {  # ended as its first round did: one image of two
            "status": "completed", "predictions_expected": 2, "predictions_failed": 1, "error": None}
        kept = conn.execute("SELECT id, status, error, superseded FROM predictions WHERE job_id = %s "
                            "ORDER BY id", (job_id,)).fetchall()
        assert kept == [
            {"id": ids[0], "status": "succeeded", "error": None, "superseded": False},
            {"id": ids[1], "status": "failed", "error": "NSFW", "superseded": True},
            {"id": f"unsubmitted-{job_id}-1-1-retry1", "status": "failed", "superseded": False,
             "error": "step 1's prediction 2 was never submitted: "
                      "the reconciler found nothing running or queued for it"}]
        assert replay(conn, check=True).differences == 0
    assert reconciled(app)["stalled"] == 0  # ended: not found again


def test_a_stalled_job_with_nothing_to_record_is_counted_and_left_alone(app):
    client = app.test_client()
    before = scrape(client)
    with app.extensions["db_pool"].connection() as conn:
        job_id = step_one_done(conn)
        assert job_row(conn, job_id)["status"] == "completed"
        conn.execute("UPDATE jobs SET status = 'processing' WHERE id = %s", (job_id,))  # a fold bug
        count = conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"]
    assert reconciled(app)["stalled_unexplained"] == 1
    with app.extensions["db_pool"].connection() as conn:
        assert conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == count
    assert value(scrape(client), "rjs_stalled_jobs_total", outcome="unexplained") \
        - value(before, "rjs_stalled_jobs_total", outcome="unexplained") == 1
