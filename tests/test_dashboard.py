"""The dashboard's page and JSON endpoints, webhook refusals counted for its health panel,
and the Server-Sent Events change feed, against a real PostgreSQL."""

from __future__ import annotations

import time

import pytest

from service import create_app, dashboard
from service.db import queries
from tests.conftest import new_job_id, payload
from tests.signing import SECRET, signed
from tests.workload import LIFECYCLE, WEBHOOK_FACTS, bodies, create_job, submit

WEBHOOK_SECRET_2 = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="


@pytest.fixture
def app(db_url):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "REPLICATE_WEBHOOK_SECRET": SECRET,
                      "DASHBOARD_FEED": {"heartbeat": 0.5, "lifetime": 10, "poll_every": 0.2}})
    yield app
    app.extensions["db_pool"].close()


def deliver(client, body: dict, webhook_id: str, job: str | None = None, secret: str = SECRET):
    raw, headers = signed(body, secret=secret, webhook_id=webhook_id)
    query = f"?job={job}&step=1" if job else ""
    return client.post(f"/webhooks/replicate{query}", data=raw, headers=headers)


def count(conn, sql: str) -> int:
    return conn.execute(sql).fetchone()["n"]


def health(client, **args) -> dict:
    response = client.get("/api/dashboard/health", query_string=args)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


# --- the page -------------------------------------------------------------------------

def test_the_page_and_its_assets_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and b'<script type="module" src="assets/app.js">' in page.data
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy and page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Referrer-Policy"] == "same-origin"
    script = client.get("/assets/app.js")
    assert script.status_code == 200 and script.mimetype == "text/javascript"
    assert client.get("/assets/../dashboard.py").status_code == 404


def test_the_page_loads_nothing_from_elsewhere(client):
    for path in sorted(dashboard.STATIC_DIR.rglob("*")):
        if path.is_file():
            text = path.read_text().lower()
            assert "cdn" not in text and "vendor/" not in text, path
    assert client.get("/assets/vendor/supabase.js").status_code == 404  # no supabase-js any more


def test_with_supabase_keys_set_the_live_updates_still_come_from_the_stream(db_url, monkeypatch):
    """SUPABASE_URL and the anon key (set for Storage and users' own apps, docs/deploy.md) do
    not switch the page to Supabase Realtime, where the anon role would receive nothing."""
    monkeypatch.setenv("SUPABASE_URL", "https://abc.supabase.co")
    monkeypatch.setenv("SUPABASE_ANON_KEY", "anon-key")
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "RECONCILE_AFTER_SECONDS": 120})
    try:
        body = app.test_client().get("/api/dashboard/config").get_json()
        assert "supabase" not in body and body["stream"] == "/api/dashboard/stream"
        assert body["reconcile_after_seconds"] == 120 and body["auth_required"] is False
        policy = app.test_client().get("/").headers["Content-Security-Policy"]
        assert "; connect-src 'self'; " in policy  # the page talks to the service only
        assert "img-src " in policy and "https://abc.supabase.co" in policy.split("img-src ")[1].split(";")[0]
        # only `flask --app service follow` reads the anon key; the page is never given it
        assert "anon-key" not in app.test_client().get("/api/dashboard/config").get_data(as_text=True)
    finally:
        app.extensions["db_pool"].close()


def test_with_api_keys_the_data_needs_a_key_and_the_page_does_not(db_url):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "API_KEYS": ("k1",)})
    try:
        client = app.test_client()
        assert client.get("/").status_code == 200
        assert client.get("/api/dashboard/config").get_json()["auth_required"] is True
        for path in ("/api/dashboard/health", "/api/dashboard/models", "/api/dashboard/stream",
                     "/api/dashboard/search?q=abcd"):
            refused = client.get(path)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert client.get("/api/dashboard/health", headers={"Authorization": "Bearer k1"}).status_code == 200
    finally:
        app.extensions["db_pool"].close()


# --- webhooks that never become events ------------------------------------------------

def test_a_bad_signature_is_counted_and_nothing_is_stored(client, conn):
    response = deliver(client, payload("processing_sdxl_partial_logs"), "msg_forged", secret=WEBHOOK_SECRET_2)
    assert response.status_code == 401 and response.get_json()["error"] == "bad_signature"
    assert count(conn, "SELECT count(*) AS n FROM events") == 0
    row = conn.execute("SELECT * FROM unrecorded_webhooks").fetchone()
    assert (row["outcome"], row["http_status"], row["webhook_id"]) == ("bad_signature", 401, "msg_forged")
    assert row["remote_addr"] == "127.0.0.1" and "did not verify" in row["detail"]
    assert health(client)["signature_failures"] == 1


def test_every_kind_of_refusal_is_counted_under_its_outcome(client, conn):
    deliver(client, {"id": "p1", "status": "exploded"}, "msg_bad")           # signed, not a prediction
    client.post("/webhooks/replicate", data=b"{}", headers={"content-type": "application/json"})  # unsigned
    big = b"{" + b" " * (1024 * 1024) + b"}"
    raw, headers = signed(big)
    client.post("/webhooks/replicate", data=raw, headers=headers)            # too large
    outcomes = health(client)["unrecorded"]
    assert outcomes == {"bad_webhook": 1, "bad_signature": 1, "body_too_large": 1}
    assert count(conn, "SELECT count(*) AS n FROM events") == 0


def test_a_redelivered_webhook_is_counted_as_a_duplicate_and_marked_in_the_timeline(client, conn):
    job = new_job_id()
    create_job(conn, job)
    body = bodies(LIFECYCLE[:1], "p-dup")[0]
    assert deliver(client, body, "msg_twice", job).get_json()["status"] == "recorded"
    assert deliver(client, body, "msg_twice", job).get_json()["status"] == "duplicate"
    assert count(conn, "SELECT count(*) AS n FROM events WHERE event_key = 'msg_twice'") == 1
    assert health(client)["duplicates"] == 1
    timeline = client.get(f"/api/dashboard/jobs/{job}/timeline").get_json()["events"]
    webhook = next(e for e in timeline if e["event_key"] == "msg_twice")
    assert webhook["redeliveries"] == 1 and webhook["type"] == "replicate.webhook"


def test_failing_to_count_a_refusal_never_changes_the_answer(client, conn, monkeypatch):
    monkeypatch.setitem(queries, "record_unrecorded_webhook", "SELECT no_such_function()")
    response = deliver(client, payload("processing_sdxl_partial_logs"), "msg_x", secret=WEBHOOK_SECRET_2)
    assert response.status_code == 401 and response.get_json()["error"] == "bad_signature"
    assert count(conn, "SELECT count(*) AS n FROM unrecorded_webhooks") == 0


# --- health, search, models, timeline, outputs, events ---------------------------------

def test_health_counts_webhooks_and_their_acknowledgement_time(client, conn):
    job = new_job_id()
    create_job(conn, job)
    for i, body in enumerate(bodies(LIFECYCLE, "p-ok")):
        assert deliver(client, body, f"msg_{i}", job).status_code == 200
    report = health(client, minutes=15)
    assert report["webhooks"]["recorded"] == 4 and report["window_minutes"] == 15
    assert report["webhooks"]["per_minute"] == round(4 / 15, 2)
    assert sum(b["recorded"] for b in report["webhooks"]["series"]) == 4
    assert len(report["webhooks"]["series"]) == dashboard.BUCKETS
    assert report["ack_ms"]["samples"] == 4 and 0 <= report["ack_ms"]["p50"] <= report["ack_ms"]["p95"] < 5000
    assert report["status_counts"]["processing"] == 1  # its output is still to be processed
    kept = report["store"]
    assert kept["deliveries_oldest"][:10] == report["at"][:10] and kept["pruned_at"] is None
    assert 0 < kept["deliveries_bytes"] < kept["database_bytes"] and kept["events_bytes"] > 0
    assert (kept["retention_days"], kept["event_partitions"]) == (30, 3)
    assert client.get("/api/dashboard/health?minutes=7").status_code == 422


def test_jobs_quiet_past_the_reconcilers_threshold_are_stuck(db_url, conn):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "RECONCILE_AFTER_SECONDS": 1})
    try:
        quiet, done = new_job_id(), new_job_id()
        create_job(conn, quiet)
        create_job(conn, done)
        submit(conn, done, bodies(["failed_flux11pro_nsfw_with_traceback_logs"], "p-f")[0])
        time.sleep(1.1)
        stuck = health(app.test_client())["stuck"]
        assert stuck["threshold_seconds"] == 1 and stuck["count"] == 1
        assert [j["id"] for j in stuck["jobs"]] == [quiet]
    finally:
        app.extensions["db_pool"].close()


def test_search_finds_a_job_by_the_end_of_its_id_or_its_start_and_a_prediction_by_id(client, conn):
    job, twin = new_job_id(), new_job_id()  # made in the same minute: their first 8 characters match
    create_job(conn, job)
    create_job(conn, twin)
    deliver(client, bodies(LIFECYCLE[:1], "pred-abc")[0], "msg_s", job)
    by_tail = client.get(f"/api/dashboard/search?q={job[-8:]}").get_json()  # what the dashboard shows
    assert [j["id"] for j in by_tail["jobs"]] == [job] and by_tail["predictions"] == []
    for odd in (job[-5:], job[-11:]):  # half a byte more than the bytes compared
        assert job in [j["id"] for j in client.get(f"/api/dashboard/search?q={odd}").get_json()["jobs"]]
    by_prefix = [j["id"] for j in client.get(f"/api/dashboard/search?q={job[:8]}").get_json()["jobs"]]
    assert job in by_prefix and (twin in by_prefix) == (twin[:8] == job[:8])
    assert client.get(f"/api/dashboard/search?q={job.upper()}").get_json()["jobs"][0]["id"] == job
    by_prediction = client.get("/api/dashboard/search?q=pred-abc").get_json()
    assert by_prediction["predictions"][0]["job_id"] == job and by_prediction["jobs"] == []
    assert client.get("/api/dashboard/search?q=nothing-here").get_json() == {"jobs": [], "predictions": []}
    assert client.get("/api/dashboard/search?q=").status_code == 422


def test_uuid_range_is_every_uuid_with_the_prefix():
    assert dashboard.uuid_range("0123-4") == ("01234000-0000-0000-0000-000000000000",
                                              "01234fff-ffff-ffff-ffff-ffffffffffff")
    assert dashboard.uuid_range("abc") is None and dashboard.uuid_range("xyz12") is None


def test_models_lists_each_model_once(client, conn):
    for model in ("b/two", "a/one", "b/two"):
        create_job(conn, new_job_id(), model=model)
    assert client.get("/api/dashboard/models").get_json() == {"models": ["a/one", "b/two"]}


def test_the_timeline_marks_repeats_and_polls_and_gives_raw_json_on_request(client, conn):
    job = new_job_id()
    create_job(conn, job)
    body = bodies(LIFECYCLE[1:2], "p-t")[0]
    deliver(client, body, "msg_first", job)
    deliver(client, body, "msg_retry", job)          # the same body under a new webhook-id
    from service import events
    events.append(conn, key="polled:p-t:1", stream=job, type="replicate.polled", data=body,
                  metadata={"source": "reconciler"})
    timeline = client.get(f"/api/dashboard/jobs/{job}/timeline").get_json()
    assert timeline["total"] == 4
    kinds = [(e["type"], e["is_repeat"], e["source"]) for e in timeline["events"]]
    assert kinds == [("job.created", False, None), ("replicate.webhook", False, "replicate"),
                     ("replicate.webhook", True, "replicate"), ("replicate.polled", False, "reconciler")]
    assert "data" not in timeline["events"][1]
    raw = client.get(f"/api/dashboard/events/{timeline['events'][1]['position']}").get_json()
    assert raw["metadata"]["headers"]["webhook-id"] == "msg_first"
    assert raw["delivery"]["body"] == body and raw["delivery"]["headers"]["webhook-id"] == "msg_first"
    assert raw["data"] == {k: v for k, v in body.items() if k in WEBHOOK_FACTS}
    assert client.get(f"/api/dashboard/jobs/{new_job_id()}/timeline").status_code == 404
    assert client.get("/api/dashboard/events/999999").status_code == 404


def test_outputs_of_a_job_without_any_is_an_empty_list(client, conn):
    job = new_job_id()
    create_job(conn, job)
    assert client.get(f"/api/dashboard/jobs/{job}/outputs").get_json() == {"outputs": []}


# --- the change feed ---------------------------------------------------------------------

def read_event(chunks, wanted: str, limit: int = 50) -> dict:
    """Read the stream until an event of this name; heartbeats in between are skipped."""
    import json
    for _ in range(limit):
        chunk = next(chunks).decode()
        if chunk.startswith(f"event: {wanted}\n"):
            return json.loads(chunk.split("data: ", 1)[1])
    raise AssertionError(f"no {wanted} event in {limit} chunks")


@pytest.mark.parametrize("listen", [True, False], ids=["listen", "poll"])
def test_the_stream_says_which_job_changed(db_url, listen):
    feed = {"heartbeat": 0.5, "lifetime": 10, "poll_every": 0.2, "listen": listen}
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "DASHBOARD_FEED": feed})
    try:
        client = app.test_client()
        response = client.get("/api/dashboard/stream", buffered=False)
        assert response.status_code == 200 and response.mimetype == "text/event-stream"
        chunks = iter(response.response)
        assert next(chunks) == b"retry: 2000\n\n"
        assert read_event(chunks, "ready")["mode"] == ("listen" if listen else "poll")
        created = client.post("/api/jobs", json={"model": "a/b", "input": {"prompt": "x"}}).get_json()
        assert read_event(chunks, "jobs") == {"ids": [created["id"]]}
        response.close()
    finally:
        app.extensions["db_pool"].close()


def test_the_stream_ends_after_its_lifetime_and_frees_its_slot(db_url):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "DASHBOARD_STREAMS": 1,
                      "DASHBOARD_FEED": {"heartbeat": 0.2, "lifetime": 0.5}})
    try:
        client = app.test_client()
        first = client.get("/api/dashboard/stream", buffered=False)
        busy = client.get("/api/dashboard/stream")
        assert busy.status_code == 503 and busy.get_json()["error"] == "streams_busy"
        chunks = b"".join(first.response).decode()
        assert ": keep-alive" in chunks and chunks.endswith('event: end\ndata: {"reason":"lifetime"}\n\n')
        first.close()
        again = client.get("/api/dashboard/stream", buffered=False)
        assert again.status_code == 200
        again.close()
    finally:
        app.extensions["db_pool"].close()


def test_the_trigger_notifies_only_while_a_feed_listens(conn, db_url):
    from service import db
    with db.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN jobs_changed")
        quiet = new_job_id()
        create_job(conn, quiet)
        assert [n.payload for n in listener.notifies(timeout=0.5)] == []  # nobody announced: no NOTIFY
        conn.execute(queries["jobs_feed_listen"], {"seconds": 60})
        heard = new_job_id()
        create_job(conn, heard)
        submit(conn, heard, bodies(LIFECYCLE[:1], "p-n")[0])
        assert [n.payload for n in listener.notifies(timeout=0.5)] == [heard, heard]  # created, then queued


def test_netlify_publishes_the_page_and_proxies_the_service():
    import tomllib

    from service.config import ROOT
    config = tomllib.loads((ROOT / "netlify.toml").read_text())
    assert config["build"]["publish"] == "service/static"
    command = config["build"]["command"]
    assert "SERVICE_URL" in command and "_redirects" in command
    assert "for prefix in api webhooks files" in command
    assert "npm" not in command  # nothing to install: the page has no npm dependency
    headers = config["headers"][0]["values"]
    policy = headers["Content-Security-Policy"]
    assert "unsafe-inline" not in policy and "script-src 'self'" in policy
    assert "; connect-src 'self'; " in policy  # the API and its stream, proxied to the service
    assert "frame-ancestors 'none'" in policy
    assert headers["X-Frame-Options"] == "DENY" and headers["Referrer-Policy"] == "same-origin"
