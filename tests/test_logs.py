"""Log lines: one JSON object per line with the ids of what they concern, and no secret in
any of them, whatever path ran (API, webhooks, worker, reconciler)."""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
import requests

from service import create_app, logs
from tests.conftest import new_job_id, payload
from tests.signing import SECRET, signed
from tests.stack import running_stack
from tests.workload import create_job

API_KEY = "sk-test-Vq8pZ3kL0wYtR7nB"
TOKEN = "r8_T0kenThatMustNeverBeLogged9x"
ANON_KEY = "eyJhbGciOiJIUzI1NiJ9.anon-key-payload.signature-part"
METRICS_TOKEN = "mt-test-4f1c9a7e2b6d8035"


@contextmanager
def captured(level: int = logging.DEBUG) -> Iterator[io.StringIO]:
    """Every log line of the service and the libraries it uses, as LOG_FORMAT=json writes them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    root, service = logging.getLogger(), logging.getLogger("service")
    saved = root.level, service.level, service.propagate
    root.addHandler(handler)
    root.setLevel(level)
    service.setLevel(level)
    service.propagate = True  # configure() stops it at its own handler
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.level, service.level, service.propagate = saved


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


def test_a_json_line_carries_the_bound_context_and_its_own_fields():
    logger = logging.getLogger("service.test_logs")
    with captured() as out:
        with logs.bound(job_id="j1", prediction_id=None):
            logger.info("inside %s", "x", extra={"action": "probe", "position": 7})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed", extra={"action": "probe"})
        logger.info("outside", extra={"action": "probe"})
    inside, failed, outside = lines(out)
    assert inside["message"] == "inside x" and inside["level"] == "INFO"
    assert inside["logger"] == "service.test_logs" and inside["time"].endswith("+00:00")
    assert (inside["job_id"], inside["position"], inside["action"]) == ("j1", 7, "probe")
    assert "prediction_id" not in inside  # None fields are not bound
    assert "ValueError: boom" in failed["exception"] and failed["job_id"] == "j1"
    assert "job_id" not in outside


@pytest.fixture
def app(db_url):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "REPLICATE_WEBHOOK_SECRET": SECRET})
    yield app
    app.extensions["db_pool"].close()


def test_a_json_line_is_timed_as_isoformat_says_to_the_millisecond():
    formatter = logs.JsonFormatter()
    rng = random.Random(7)
    times = [1.7e9 + 0.9999996, 1.7e9 + 0.9999995, 1.7e9 + 0.0000005, 1.7e9 + 0.0015, 1.7e9, 0.0]
    times += sorted(rng.uniform(0, 4e9) for _ in range(2000))
    for created in times:  # in order, and back again, so the cached second changes both ways
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert formatter.timestamp(created) == expected, created
    for created in reversed(times):
        assert formatter.timestamp(created) == datetime.fromtimestamp(created, UTC).isoformat(
            timespec="milliseconds"), created


def test_webhook_lines_name_the_webhook_prediction_job_and_position(client, conn):
    create_job(conn, job := new_job_id())
    body, headers = signed(payload("processing_sdxl_partial_logs"), webhook_id="msg_logged")
    with captured() as out:
        client.post(f"/webhooks/replicate?job={job}", data=body, headers=headers)
        client.post(f"/webhooks/replicate?job={job}", data=body,
                    headers=dict(headers, **{"webhook-signature": "v1,AAAA"}))
    recorded = next(line for line in lines(out) if line.get("action") == "webhook")
    assert (recorded["webhook_id"], recorded["job_id"], recorded["position"]) == ("msg_logged", job, 2)
    assert recorded["prediction_id"] == json.loads(body)["id"]
    refused = next(line for line in lines(out) if line.get("action") == "webhook_refused")
    assert (refused["webhook_id"], refused["job_id"]) == ("msg_logged", job)
    assert refused["reason"] == "bad_signature"


def test_no_secret_reaches_the_logs_on_any_path(db_url):
    with captured() as out, running_stack(db_url, API_KEYS=(API_KEY,), REPLICATE_API_TOKEN=TOKEN,
                                          SUPABASE_ANON_KEY=ANON_KEY, METRICS_TOKEN=METRICS_TOKEN) as stack:
        stack.sim._server.api.token = TOKEN  # the simulator now insists on this token, so it is really sent
        auth = {"Authorization": f"Bearer {API_KEY}"}
        created = requests.post(f"{stack.base_url}/api/jobs", headers=auth, timeout=10, json={
            "model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse", "aspect_ratio": "3:4"}})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        wrong = requests.get(f"{stack.base_url}/api/jobs", timeout=10,
                             headers={"Authorization": "Bearer sk-test-WrongGuess1234"})
        assert wrong.status_code == 401
        job = wait_finished(stack, job_id, auth)
        assert job["status"] == "completed", job
        secret = stack.app.config["REPLICATE_WEBHOOK_SECRET"]  # fetched from the simulator
        for token, status in ((METRICS_TOKEN, 200), ("mt-test-WrongGuess5678", 401)):
            scraped = requests.get(f"{stack.base_url}/metrics", timeout=10,
                                   headers={"Authorization": f"Bearer {token}"})
            assert scraped.status_code == status
    text = out.getvalue()
    assert secret and secret.startswith("whsec_")
    for value in (API_KEY, "sk-test-WrongGuess1234", TOKEN, secret, secret.removeprefix("whsec_"), ANON_KEY,
                  METRICS_TOKEN, "mt-test-WrongGuess5678"):
        assert value not in text, f"a secret is in the log: {value[:6]}…"
    parsed = lines(out)
    actions = {line.get("action") for line in parsed}
    assert {"webhook", "task", "download", "store", "append_event", "create_job"} <= actions
    for line in parsed:  # the worker's lines name the job they work for, whichever module logs them
        if line.get("action") in {"download", "store", "task"}:
            assert line.get("job_id") == job_id, line


def wait_finished(stack, job_id: str, auth: dict) -> dict:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = requests.get(f"{stack.base_url}/api/jobs/{job_id}", headers=auth, timeout=10).json()
        if job["status"] in ("completed", "failed", "canceled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")
