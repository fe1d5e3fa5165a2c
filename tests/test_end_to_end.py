"""The Replicate path end to end over real HTTP: API → queue → worker → simulator →
signed webhooks → event store → projection, with the simulator's faults switched on."""

from __future__ import annotations

import time

import requests

from service import imaging
from tests.stack import running_stack

SETTLED = {"processing", "completed", "failed"}


def assert_matches_simulator(stack, job: dict) -> None:
    """Every prediction in the job view says what the simulator finally said of it."""
    truth = stack.sim.predictions
    for prediction in job["predictions"]:
        final = truth[prediction["id"]]
        assert prediction["status"] == final["status"], prediction["id"]
        assert prediction["error"] == final.get("error")
        assert prediction["metrics"] == (final.get("metrics") or {})
    with stack.app.extensions["db_pool"].connection() as conn:
        rows = conn.execute("SELECT id, output_urls, logs_length FROM predictions WHERE job_id = %s",
                            (job["id"],)).fetchall()
    for row in rows:
        final = truth[row["id"]]
        assert row["output_urls"] == (final["output"] or [])
        assert row["logs_length"] == len(final["logs"] or "")


def fetch_image(url: str) -> tuple[str, int, int]:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, url
    return imaging.probe(response.content)


def test_a_single_job_runs_end_to_end(db_url):
    with running_stack(db_url) as stack:
        created = stack.create_job(model="stability-ai/sdxl",
                                   input={"prompt": "a lighthouse", "aspect_ratio": "3:4"})
        assert created["status"] == "pending" and created["aspect_ratio"] == "3:4"
        job = stack.wait(created["id"], {"completed", "failed"})
        assert job["status"] == "completed", job
        assert job["progress"] == {"total": 1, "succeeded": 1, "failed": 0, "processed": 1}
        assert len(job["predictions"]) == 1
        assert_matches_simulator(stack, job)
        [output] = job["outputs"]
        assert (output["width"], output["height"]) == (1080, 1440)
        assert fetch_image(output["url"]) == ("png", 1080, 1440)
        assert fetch_image(output["source_url"]) == ("png", 768, 1024)  # what the model made
        kinds = [e["type"] for e in stack_events(stack, job["id"])]
        # Replicate's start webhook may be recorded before our record of its create answer
        assert kinds[0] == "job.created"
        assert {"prediction.submitted", "replicate.webhook", "output.processed"} <= set(kinds)


def test_a_batch_job_runs_every_prediction(db_url):
    with running_stack(db_url) as stack:
        created = stack.create_job(model="black-forest-labs/flux-schnell",
                                   input={"prompt": "training image"}, count=6)
        job = stack.wait(created["id"], {"completed", "failed"}, seconds=60)
        assert job["status"] == "completed" and len(job["predictions"]) == 6
        assert job["progress"] == {"total": 6, "succeeded": 6, "failed": 0, "processed": 6}
        assert {(o["width"], o["height"]) for o in job["outputs"]} == {(2048, 2048)}  # 1:1 upscaled
        assert_matches_simulator(stack, job)


def test_duplicated_and_reordered_webhooks_give_the_clean_view(db_url):
    with running_stack(db_url, faults={"faults": ["duplicate", "reorder"], "seed": 7}) as stack:
        created = stack.create_job(model="stability-ai/sdxl", input={"prompt": "storm"}, count=3)
        job = stack.wait(created["id"], SETTLED)
        assert_matches_simulator(stack, job)
        ids = [d.webhook_id for d in stack.sim.webhook_log]
        assert len(ids) > len(set(ids))  # the fault really delivered some webhooks twice or more
        # Delayed (reordered) deliveries may still be in flight when the job settles: one can
        # be recorded before the simulator logs its 200. Compare once the two agree or time out.
        deadline = time.monotonic() + 15
        while True:
            acknowledged = {d.webhook_id for d in stack.sim.webhook_log if d.response_code == 200}
            with stack.app.extensions["db_pool"].connection() as conn:
                recorded = {r["event_key"] for r in conn.execute(
                    "SELECT event_key FROM events WHERE type = 'replicate.webhook'")}
            if recorded == acknowledged or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert recorded == acknowledged  # each acknowledged webhook-id recorded once, nothing else


def test_a_job_whose_webhooks_are_all_lost_is_completed_by_the_reconciler(db_url):
    faults = {"faults": ["drop"], "drop_rate": 1.0}
    with running_stack(db_url, faults=faults, reconcile_after=1) as stack:
        created = stack.create_job(model="stability-ai/sdxl", input={"prompt": "silence"}, count=2)
        job = stack.wait(created["id"], SETTLED, seconds=60)
        assert_matches_simulator(stack, job)
        kinds = {e["type"] for e in stack_events(stack, job["id"])}
        assert "replicate.webhook" not in kinds and "replicate.polled" in kinds


def test_a_failed_prediction_fails_the_job_with_replicates_error(db_url):
    with running_stack(db_url) as stack:
        created = stack.create_job(model="stability-ai/sdxl", input={"prompt": "please fail"})
        job = stack.wait(created["id"], {"failed"})
        assert job["error"] and job["error"] == job["predictions"][0]["error"]
        assert_matches_simulator(stack, job)


def test_rate_limited_submissions_are_paced_and_all_go_through(db_url):
    faults = {"faults": ["ratelimit"], "rate_limit": 2, "rate_window": 1.0}
    with running_stack(db_url, faults=faults) as stack:
        created = stack.create_job(model="black-forest-labs/flux-schnell", input={"prompt": "x"}, count=5)
        job = stack.wait(created["id"], SETTLED, seconds=60)
        assert job["progress"]["succeeded"] == 5
        with stack.app.extensions["db_pool"].connection() as conn:
            failures = conn.execute("SELECT count(*) AS n FROM events WHERE type = 'prediction.submit_failed'"
                                    ).fetchone()["n"]
        assert failures == 0


def test_cancel_stops_the_predictions_at_replicate(db_url):
    with running_stack(db_url, speed=2.0) as stack:
        created = stack.create_job(model="stability-ai/sdxl", input={"prompt": "slow"}, count=2)
        stack.wait(created["id"], {"queued", "running"})
        response = requests.post(f"{stack.base_url}/api/jobs/{created['id']}/cancel", timeout=10)
        assert response.status_code == 202
        job = stack.wait(created["id"], {"canceled"})
        assert job["status"] == "canceled" and job["completed_at"] is not None
        # the cancel tasks run after the job is recorded canceled; give them a moment
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not all(
                stack.sim.predictions[p["id"]]["status"] in ("canceled", "succeeded")
                for p in stack.job(created["id"])["predictions"]):
            time.sleep(0.2)
        for prediction in stack.job(created["id"])["predictions"]:
            assert stack.sim.predictions[prediction["id"]]["status"] in ("canceled", "succeeded")
        assert stack.job(created["id"])["status"] == "canceled"


def stack_events(stack, job_id: str) -> list[dict]:
    response = requests.get(f"{stack.base_url}/api/jobs/{job_id}/events", timeout=10)
    assert response.status_code == 200
    return response.json()["events"] if isinstance(response.json(), dict) else response.json()


def test_a_two_step_job_feeds_step_ones_processed_output_to_step_two(db_url):
    with running_stack(db_url) as stack:
        created = stack.create_job(
            model="black-forest-labs/flux-schnell", input={"prompt": "a portrait"}, aspect_ratio="9:16",
            then={"model": "black-forest-labs/flux-kontext-pro",
                  "input": {"prompt": "put it in the template", "input_image": "{{outputs[0]}}"}})
        job = stack.wait(created["id"], {"completed", "failed"}, seconds=60)
        assert job["status"] == "completed", job
        steps = sorted(p["step"] for p in job["predictions"])
        assert steps == [1, 2]
        first = next(o for o in job["outputs"] if o.get("step", 1) == 1)
        second = next(p for p in job["predictions"] if p["step"] == 2)
        sent = stack.sim.predictions[second["id"]]["input"]
        assert sent["input_image"] == first["url"]  # step 2 got step 1's processed output
        assert fetch_image(first["url"])[1:] == (1080, 1920)
        assert len(job["outputs"]) == 2
