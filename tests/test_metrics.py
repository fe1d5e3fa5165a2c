"""GET /metrics (Prometheus text format) and GET /readyz against a real database."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from service import create_app, db, queue
from service.replay import _announce, replay
from service.worker import Context, Worker
from tests.conftest import new_job_id, payload
from tests.signing import SECRET, signed
from tests.waiting import wait_for
from tests.workload import create_job


@pytest.fixture
def app(db_url):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "REPLICATE_WEBHOOK_SECRET": SECRET})
    yield app
    app.extensions["db_pool"].close()


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.get_data(as_text=True))
            for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_webhooks_are_counted_by_outcome_with_their_acknowledgement_time(client, conn):
    before = scrape(client)
    create_job(conn, job := new_job_id())
    body, headers = signed(payload("processing_sdxl_partial_logs"))
    assert client.post(f"/webhooks/replicate?job={job}", data=body, headers=headers).status_code == 200
    assert client.post(f"/webhooks/replicate?job={job}", data=body, headers=headers).status_code == 200
    bad_signature = dict(headers, **{"webhook-signature": "v1,AAAA"})
    assert client.post("/webhooks/replicate", data=body, headers=bad_signature).status_code == 401
    raw, signed_headers = signed(b"[1]")
    assert client.post("/webhooks/replicate", data=raw, headers=signed_headers).status_code == 400
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("rjs_webhooks_received_total") == 4
    assert delta("rjs_webhooks_recorded_total") == 1
    assert delta("rjs_webhooks_duplicate_total") == 1
    assert delta("rjs_webhooks_rejected_total", reason="bad_signature") == 1
    assert delta("rjs_webhooks_rejected_total", reason="bad_webhook") == 1
    assert delta("rjs_webhook_ack_seconds_count") == 2
    assert delta("rjs_webhook_ack_seconds_bucket", le="+Inf") == 2
    assert delta("rjs_webhook_ack_seconds_sum") > 0
    assert value(after, "rjs_events_last_position") == 2
    assert value(after, "rjs_database_up") == 1


def test_each_webhook_answered_200_is_timed_stage_by_stage(client, conn):
    before = scrape(client)
    create_job(conn, job := new_job_id())
    body, headers = signed(payload("processing_sdxl_partial_logs"))
    for _ in range(2):  # closed, as a WSGI server closes a response once it is written
        with client.post(f"/webhooks/replicate?job={job}", data=body, headers=headers) as response:
            assert response.status_code == 200
    raw, refused_headers = signed(b"[1]")
    assert client.post("/webhooks/replicate", data=raw, headers=refused_headers).status_code == 400
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for stage in ("verify", "group_wait", "database", "wake", "respond"):
        assert delta("rjs_webhook_stage_seconds_count", stage=stage) == 2, stage
    assert delta("rjs_webhook_stage_seconds_sum", stage="database") > 0
    # no gunicorn (the test client): nothing says how long a request waited for a thread
    assert delta("rjs_webhook_stage_seconds_count", stage="queue") == 0


def test_under_gunicorn_a_webhook_is_timed_from_its_wait_for_a_thread(db_url, tmp_path):
    """gunicorn.conf.py's worker stamps each request: queue and dispatch are timed too."""
    from tests.test_exposure import clean_env, free_port, gunicorn, running

    port = free_port()
    env = clean_env(db_url, tmp_path, PORT=str(port), REPLICATE_WEBHOOK_SECRET=SECRET)
    body, headers = signed(payload("processing_sdxl_partial_logs"))
    with running(gunicorn(env), port) as base:
        assert requests.post(f"{base}/webhooks/replicate", data=body, headers=headers,
                             timeout=30).status_code == 200
        samples: dict = {}

        def respond_timed() -> bool:  # observed once the answer is written, so just after it
            text = requests.get(f"{base}/metrics", timeout=30).text
            samples.update({(s.name, tuple(sorted(s.labels.items()))): s.value
                            for family in text_string_to_metric_families(text) for s in family.samples})
            return value(samples, "rjs_webhook_stage_seconds_count", stage="respond") == 1

        wait_for("the webhook's stages in /metrics", respond_timed, 10)
    for stage in ("queue", "dispatch", "verify", "database", "respond"):
        assert value(samples, "rjs_webhook_stage_seconds_count", stage=stage) == 1, stage
    assert 0 <= value(samples, "rjs_webhook_stage_seconds_sum", stage="queue") < 5


def test_queue_depth_and_the_oldest_ready_task_come_from_the_tasks_table(client, conn):
    response = client.post("/api/jobs", json={"model": "a/b", "input": {"prompt": "x"}, "count": 3})
    assert response.status_code == 201
    queue.enqueue(conn, "process_output", "later", None, {}, run_after=None)
    conn.execute("UPDATE tasks SET run_after = now() - interval '90 s' WHERE kind = 'submit_prediction'")
    conn.execute("UPDATE tasks SET run_after = now() + interval '1 hour' WHERE kind = 'process_output'")
    queue.claim(conn, "w", 60, ("submit_prediction",))
    samples = scrape(client)
    assert value(samples, "rjs_queue_depth", kind="submit_prediction", status="queued") == 2
    assert value(samples, "rjs_queue_depth", kind="submit_prediction", status="running") == 1
    assert value(samples, "rjs_queue_depth", kind="process_output", status="queued") == 1
    assert 90 <= value(samples, "rjs_queue_oldest_ready_seconds", kind="submit_prediction") < 600
    assert value(samples, "rjs_queue_oldest_ready_seconds", kind="process_output") == 0  # not ready yet


def test_a_running_replay_shows_its_phase(app, client, db_url):
    with db.connect(db_url) as replaying, replaying.transaction():
        _announce(replaying, None, "outputs")
        samples = scrape(client)
    assert value(samples, "rjs_replay_running") == 1
    assert value(samples, "rjs_replay_phase", scope="all", stage="outputs", stages="9") == 4
    assert 0 <= value(samples, "rjs_replay_seconds", scope="all") < 60
    # The name ends with the session: its server process exits after the connection closes,
    # not before close() returns, so pg_stat_activity may list it for a moment longer (CI
    # once scraped it still there)
    wait_for("the replay's session to leave pg_stat_activity",
             lambda: value(scrape(client), "rjs_replay_running") == 0, 10)


def test_replay_names_each_stage_and_leaves_the_session_as_it_was(db_url):
    with db.connect(db_url, autocommit=True) as conn:
        seen: list[str] = []
        replay(conn, check=True, progress=lambda step: seen.append(
            conn.execute("SELECT current_setting('application_name') AS a").fetchone()["a"]))
        stages = [name.rsplit(":", 1) for name in seen]
        assert [stage for stage, _ in stages] == [
            "rjs-replay:all:1:9:snapshot", "rjs-replay:all:2:9:scan", "rjs-replay:all:3:9:predictions",
            "rjs-replay:all:4:9:outputs", "rjs-replay:all:5:9:jobs", "rjs-replay:all:6:9:indexes",
            "rjs-replay:all:7:9:compare"]
        assert len({started for _, started in stages}) == 1  # when the replay began, in each
        assert abs(int(stages[0][1]) - time.time()) < 60
        assert not conn.execute("SELECT current_setting('application_name') AS a").fetchone()["a"] \
            .startswith("rjs-replay")


class Flaky:
    """A handler that fails its first run and succeeds the next (transient failures)."""

    def __init__(self) -> None:
        self.runs = 0

    def run(self, ctx: Context, task) -> None:
        self.runs += 1
        if self.runs == 1:
            raise OSError("connection reset")
        with ctx.pool.connection() as conn:
            queue.complete(conn, task, ctx.worker)

    def give_up(self, ctx: Context, task, reason: str, final: bool) -> None:
        raise AssertionError("not expected")


def test_worker_tasks_are_counted_by_outcome_and_timed(app, client, conn):
    before = scrape(client)
    queue.enqueue(conn, "cancel_prediction", f"cancel:{uuid.uuid4()}", None, {"prediction_id": "p1"})
    worker = Worker(Context(app.extensions["db_pool"], "w1", app.config), {"cancel_prediction": Flaky()})
    assert worker.run_once()
    conn.execute("UPDATE tasks SET run_after = now()")
    assert worker.run_once()
    after = scrape(client)
    runs = {o: value(after, "rjs_tasks_total", kind="cancel_prediction", outcome=o)
            - value(before, "rjs_tasks_total", kind="cancel_prediction", outcome=o)
            for o in ("retried", "done")}
    assert runs == {"retried": 1, "done": 1}
    assert value(after, "rjs_task_seconds_count", kind="cancel_prediction") \
        - value(before, "rjs_task_seconds_count", kind="cancel_prediction") == 2


def test_readyz_is_ready_when_every_migration_is_applied(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ready"


def test_readyz_is_not_ready_while_shutting_down(app, client):
    from service.health import shutting_down

    shutting_down(app).set()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "reason": "shutting down"}
    assert client.get("/healthz").status_code == 200  # alive, just not taking new work


def test_readyz_is_not_ready_with_a_migration_missing(client, conn):
    conn.execute("DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations)")
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["reason"] == "migrations not applied" and len(body["missing"]) == 1


def test_readyz_and_metrics_without_a_database(tmp_path):
    app = create_app({"TESTING": True, "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/none",
                      "DB_POOL_MIN": 0})
    client = app.test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["reason"] == "database unreachable"
    samples = scrape(client)
    assert value(samples, "rjs_database_up") == 0
    assert json.loads(client.get("/healthz").get_data())["status"] == "unavailable"
    app.extensions["db_pool"].close()


def test_sigterm_to_a_gunicorn_worker_makes_readyz_say_so(app, client, monkeypatch, tmp_path):
    """gunicorn.conf.py's post_worker_init hook, with a stand-in for gunicorn's own handler."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # so reading the file changes no env
    import runpy
    import signal
    from types import SimpleNamespace

    from service.config import ROOT

    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    stopped: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    try:
        conf["post_worker_init"](SimpleNamespace(wsgi=app))
        assert client.get("/readyz").status_code == 200
        signal.raise_signal(signal.SIGTERM)
        assert stopped == [signal.SIGTERM]  # gunicorn's graceful stop still runs
        assert client.get("/readyz").get_json() == {"status": "unavailable", "reason": "shutting down"}
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_reconciler_actions_are_counted(db_url):
    from tests.stack import running_stack

    with running_stack(db_url, faults={"faults": ["drop"], "drop_rate": 1.0}, reconcile_after=1) as stack:
        client = stack.app.test_client()
        before = scrape(client)
        created = stack.create_job(model="stability-ai/sdxl", input={"prompt": "a lighthouse"})
        assert stack.wait(created["id"], {"completed", "failed"})["status"] == "completed"
        after = scrape(client)
    # every webhook was lost: only the reconciler's polls could tell the service the outcome
    assert value(after, "rjs_reconciler_actions_total", action="polled") \
        - value(before, "rjs_reconciler_actions_total", action="polled") >= 1
    assert value(after, "rjs_webhooks_received_total") == value(before, "rjs_webhooks_received_total")
