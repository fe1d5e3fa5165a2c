from __future__ import annotations

import json
import time
from datetime import UTC

import pytest
from standardwebhooks.webhooks import Webhook

from service import create_app
from service.config import Settings
from service.errors import ConfigError
from tests.conftest import FIXTURES, PAYLOADS, new_job_id, payload
from tests.signing import SECRET, signed
from tests.waiting import wait_for
from tests.workload import create_job, facts

VECTORS = json.loads((FIXTURES / "signing_vectors.json").read_text())["vectors"]


@pytest.fixture
def app(db_url):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "REPLICATE_WEBHOOK_SECRET": SECRET})
    yield app
    app.extensions["db_pool"].close()


def post(client, body, headers, query=""):
    return client.post(f"/webhooks/replicate{query}", data=body, headers=headers)


def stored(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"]


def test_a_signed_webhook_is_recorded_with_its_metadata(client, conn):
    job = new_job_id()
    create_job(conn, job)
    body, headers = signed(payload("processing_sdxl_partial_logs"), webhook_id="msg_a1")
    response = post(client, body, headers, f"?job={job}&step=1")
    assert response.status_code == 200
    assert response.get_json() == {"status": "recorded", "position": 2}
    event = conn.execute("SELECT * FROM events WHERE position = 2").fetchone()
    assert (event["event_key"], event["stream"], event["type"]) == ("msg_a1", job, "replicate.webhook")
    assert event["data"] == facts(json.loads(body))
    delivery = conn.execute("SELECT * FROM deliveries").fetchone()
    assert (delivery["position"], delivery["webhook_id"], delivery["body"]) == (2, "msg_a1", json.loads(body))
    assert delivery["headers"] == event["metadata"]["headers"]
    assert event["metadata"]["query"] == {"job": job, "step": "1", "index": None}
    assert event["metadata"]["headers"]["webhook-id"] == "msg_a1"
    assert "webhook-signature" not in event["metadata"]["headers"]
    prediction = conn.execute("SELECT job_id, step, status FROM predictions").fetchone()
    assert (str(prediction["job_id"]), prediction["step"], prediction["status"]) == (job, 1, "processing")


def test_a_redelivery_is_acknowledged_as_a_duplicate_and_recorded_once(client, conn):
    body, headers = signed(payload("succeeded_sdxl_polled_list_output"), webhook_id="msg_dup")
    first = post(client, body, headers).get_json()
    again = post(client, body, headers)
    assert again.status_code == 200
    assert again.get_json() == {"status": "duplicate", "position": first["position"]}
    assert stored(conn) == 1


def test_any_one_valid_signature_of_several_suffices(client, conn):
    body, headers = signed(payload("starting_sdxl_create_response"))
    _, old_key = signed(body, secret="whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=",
                        webhook_id=headers["webhook-id"], timestamp=int(headers["webhook-timestamp"]))
    headers["webhook-signature"] = (f"v2,ignored {old_key['webhook-signature']} "
                                    f"{headers['webhook-signature']}")
    assert post(client, body, headers).status_code == 200
    assert stored(conn) == 1


@pytest.mark.parametrize("tamper,reason", [
    (lambda b, h: (b.replace(b"processing", b"succeeded"), h), "signature did not verify"),
    (lambda b, h: (b, {**h, "webhook-id": "msg_other"}), "signature did not verify"),
    (lambda b, h: (b, {**h, "webhook-signature": "v1,invalid_signature"}), "did not verify"),
    (lambda b, h: (b, {**h, "webhook-signature": "garbage-without-comma"}), "did not verify"),
    (lambda b, h: signed(json.loads(b), secret="whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="),
     "signature did not verify"),
    (lambda b, h: signed(json.loads(b), timestamp=time.time() - 6 * 60), "too old"),
    (lambda b, h: signed(json.loads(b), timestamp=time.time() + 6 * 60), "too new"),
    (lambda b, h: (b, {k: v for k, v in h.items() if k != "webhook-signature"}),
     "missing header: webhook-signature"),
    (lambda b, h: (b, {"content-type": "application/json"}),
     "missing headers: webhook-id, webhook-timestamp, webhook-signature"),
])
def test_an_unverifiable_webhook_is_refused_and_nothing_is_stored(client, conn, tamper, reason):
    body, headers = tamper(*signed(payload("processing_sdxl_partial_logs")))
    response = post(client, body, headers)
    assert response.status_code == 401
    assert response.get_json()["error"] == "bad_signature"
    assert reason in response.get_json()["message"]
    assert stored(conn) == 0


def test_timestamps_just_inside_the_window_are_accepted(client):
    for offset in (-4 * 60, 4 * 60):
        body, headers = signed(payload("processing_sdxl_partial_logs"), timestamp=time.time() + offset)
        assert post(client, body, headers).status_code == 200


@pytest.mark.parametrize("body,reason", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"status": "processing"}).encode(), "`id` must be a non-empty string"),
    (json.dumps({"id": "p1", "status": "done"}).encode(), "`status` must be one of"),
    (json.dumps({"id": "p1", "status": "starting", "created_at": "yesterday"}).encode(),
     "`created_at` must be an RFC 3339 timestamp"),
    (json.dumps({"id": "", "status": "starting"}).encode(), "`id` must be a non-empty string"),
])
def test_a_signed_body_that_is_not_a_prediction_is_400_and_nothing_is_stored(client, conn, body, reason):
    raw, headers = signed(body)
    response = post(client, raw, headers)
    assert response.status_code == 400
    assert reason in response.get_json()["message"]
    assert stored(conn) == 0


def test_a_body_over_the_limit_is_413_and_nothing_is_stored(client, conn):
    big = dict(payload("processing_sdxl_partial_logs"), logs="x" * (1024 * 1024))
    raw, headers = signed(big)
    response = post(client, raw, headers)
    assert response.status_code == 413
    assert response.get_json()["error"] == "body_too_large"
    assert stored(conn) == 0


def test_unknown_or_missing_job_makes_an_orphan_that_is_still_acknowledged(client, conn):
    body, headers = signed(payload("succeeded_flux_pro_single_string_output_image_count"))
    assert post(client, body, headers, f"?job={new_job_id()}&step=1").status_code == 200
    body2, headers2 = signed(payload("succeeded_sdxl_polled_list_output"))
    assert post(client, body2, headers2, "?job=not-a-uuid").status_code == 200
    streams = {r["stream"] for r in conn.execute("SELECT stream FROM events")}
    assert streams == {json.loads(body)["id"], json.loads(body2)["id"]}
    assert conn.execute("SELECT count(*) AS n FROM predictions WHERE job_id IS NULL").fetchone()["n"] == 2


def test_a_webhook_without_job_finds_the_job_through_the_known_prediction(client, conn):
    job = new_job_id()
    create_job(conn, job)
    body, headers = signed(payload("processing_sdxl_partial_logs"))
    post(client, body, headers, f"?job={job}")
    later, headers2 = signed(payload("succeeded_sdxl_polled_list_output") | {"id": json.loads(body)["id"]})
    assert post(client, later, headers2).status_code == 200
    webhooks = conn.execute("SELECT stream FROM events WHERE type = 'replicate.webhook'").fetchall()
    assert {r["stream"] for r in webhooks} == {job}


@pytest.mark.parametrize("name", sorted(p.stem for p in PAYLOADS.glob("*.json")))
def test_every_real_replicate_body_is_accepted(client, conn, name):
    body, headers = signed(payload(name))
    response = post(client, body, headers)
    assert response.status_code == 200, response.get_json()
    row = conn.execute("SELECT status FROM predictions WHERE id = %s", (payload(name)["id"],)).fetchone()
    assert row["status"] == payload(name)["status"]


@pytest.mark.parametrize("vector", [v for v in VECTORS if "webhook_signature" in v], ids=lambda v: v["name"])
def test_signatures_agree_with_the_published_vectors(vector):
    """The vectors' 2021 timestamps are long stale, so this checks the signature alone."""
    from datetime import datetime

    body = vector.get("body")
    if body is None:  # "payloads/x.json (file content without the trailing newline)"
        body = (FIXTURES / vector["body_file"].split(" ")[0]).read_text().rstrip("\n")
    when = datetime.fromtimestamp(int(vector["webhook_timestamp"]), tz=UTC)
    ours = Webhook(vector["secret"]).sign(vector["webhook_id"], when, body)
    assert (ours in vector["webhook_signature"].split(" ")) is vector["expect_valid"]


def test_a_published_vector_is_refused_as_stale_by_the_endpoint(client, conn):
    vector = next(v for v in VECTORS if v["name"] == "canonical_valid")
    names = ("webhook_id", "webhook_timestamp", "webhook_signature")
    headers = {k.replace("_", "-"): vector[k] for k in names}
    app_secret = client.application.config["REPLICATE_WEBHOOK_SECRET"]
    assert app_secret == vector["secret"]
    response = post(client, vector["body"].encode(), headers)
    assert response.status_code == 401 and "too old" in response.get_json()["message"]
    assert stored(conn) == 0


def test_a_malformed_secret_stops_startup_with_a_clear_message():
    with pytest.raises(ConfigError, match="REPLICATE_WEBHOOK_SECRET must look like whsec_"):
        Settings.from_env({"REPLICATE_WEBHOOK_SECRET": "not-a-secret"})
    with pytest.raises(ConfigError, match="must be base64 after whsec_"):
        Settings.from_env({"REPLICATE_WEBHOOK_SECRET": "whsec_!!!"})


def test_without_a_secret_or_token_webhooks_are_503(db_url, conn):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "REPLICATE_WEBHOOK_SECRET": None,
                      "REPLICATE_API_TOKEN": None})
    body, headers = signed(payload("processing_sdxl_partial_logs"))
    response = app.test_client().post("/webhooks/replicate", data=body, headers=headers)
    app.extensions["db_pool"].close()
    assert response.status_code == 503
    assert "REPLICATE_WEBHOOK_SECRET" in response.get_json()["message"]
    assert stored(conn) == 0


def test_the_pooled_connection_goes_back_in_its_usual_transactional_mode(app, client):
    body, headers = signed(payload("processing_sdxl_partial_logs"))
    assert post(client, body, headers).status_code == 200
    pool = app.extensions["db_pool"]
    for _ in range(pool.get_stats()["pool_size"]):
        with pool.connection() as conn:
            assert conn.autocommit is False


@pytest.mark.parametrize("wrap", [lambda raw: b"\xef\xbb\xbf" + raw, lambda raw: b" \n" + raw + b"\n"],
                         ids=["utf8_bom", "surrounding_whitespace"])
def test_a_body_that_does_not_open_with_a_brace_is_stored_as_parsed(client, conn, wrap):
    raw, _ = signed(payload("succeeded_sdxl_polled_list_output"))
    body, headers = signed(wrap(raw))
    assert post(client, body, headers).status_code == 200
    assert conn.execute("SELECT body FROM deliveries").fetchone()["body"] == json.loads(raw)
    assert conn.execute("SELECT data FROM events").fetchone()["data"] == facts(json.loads(raw))


# ---- group commit: webhooks that arrive together are recorded in one transaction

def hold_stream(db_url: str, stream: str):
    """A transaction holding the advisory lock append_event takes for `stream`, so a group
    recording a webhook of that stream waits in the database until it is closed."""
    from service import db

    blocker = db.connect(db_url)
    blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (stream,))
    return blocker


def waiting_on_the_lock(conn) -> bool:
    return conn.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event = 'advisory' "
                        "AND datname = current_database()").fetchone()["n"] > 0


def deliver_while_held(app, db_url, conn, job, first, rest, release=True):
    """Deliver `first` (a webhook of `job`, held at the lock), then `rest` (each a
    (body, headers, query) or (body, headers)) while it waits; release the lock once they
    all queue behind it, or never. Each delivery's response."""
    from concurrent.futures import ThreadPoolExecutor

    groups = app.extensions["webhook_groups"]
    blocker = hold_stream(db_url, job)
    try:
        with ThreadPoolExecutor(len(rest) + 1) as pool:
            futures = [pool.submit(post, app.test_client(), *first, f"?job={job}&step=1")]
            wait_for("the first to wait on the lock", lambda: waiting_on_the_lock(conn), 10)
            futures += [pool.submit(post, app.test_client(), *delivery) for delivery in rest]
            wait_for("the rest to queue", lambda: groups.waiting == len(rest), 10)
            if release:
                blocker.commit()
            return [f.result() for f in futures]
    finally:
        blocker.close()


def a_job_and_its_first_webhook(conn) -> tuple[str, tuple[bytes, dict]]:
    job = new_job_id()
    create_job(conn, job)
    return job, signed(payload("starting_sdxl_create_response"), webhook_id="msg_first")


def processing(prediction_id: str, webhook_id: str) -> tuple[bytes, dict]:
    return signed({**payload("processing_sdxl_partial_logs"), "id": prediction_id}, webhook_id=webhook_id)


def test_webhooks_arriving_during_a_commit_are_committed_together_each_with_its_answer(app, db_url, conn):
    job, first = a_job_and_its_first_webhook(conn)
    rest = [processing(f"orphan{i}", f"msg_g{i}") for i in range(6)]
    rest.append(rest[0])  # a redelivery in the same group: recorded once
    responses = deliver_while_held(app, db_url, conn, job, first, rest)
    answers = [r.get_json() for r in responses]
    assert [r.status_code for r in responses] == [200] * 8
    assert [a["status"] for a in answers] == ["recorded"] * 7 + ["duplicate"]
    assert answers[-1]["position"] == answers[1]["position"]
    rows = conn.execute("SELECT position, event_key, stream, xmin::text AS tx FROM events "
                        "WHERE type = 'replicate.webhook' ORDER BY position").fetchall()
    assert len(rows) == 7
    keys = ["msg_first"] + [f"msg_g{i}" for i in range(6)]
    assert {r["event_key"]: r["position"] for r in rows} == {
        key: a["position"] for key, a in zip(keys, answers, strict=False)}
    assert len({r["tx"] for r in rows}) == 2  # the first alone, then the six together
    orphans = conn.execute("SELECT count(*) AS n FROM predictions WHERE id LIKE 'orphan%' "
                           "AND status = 'processing' AND job_id IS NULL").fetchone()
    assert orphans["n"] == 6


def test_a_webhook_the_database_refuses_fails_alone_and_its_group_is_recorded(app, db_url, conn):
    job, first = a_job_and_its_first_webhook(conn)
    good = [processing(f"ok{i}", f"msg_ok{i}") for i in range(3)]
    # json.loads reads \u0000, a jsonb cannot hold it: only the database refuses this one
    bad = signed(b'{"id": "p_nul", "status": "processing", "logs": "a\\u0000b"}', webhook_id="msg_bad")
    responses = deliver_while_held(app, db_url, conn, job, first, [good[0], bad, good[1], good[2]])
    assert [r.status_code for r in responses] == [200, 200, 400, 200, 200]
    assert responses[2].get_json()["error"] == "invalid_event"
    keys = [r["event_key"] for r in conn.execute("SELECT event_key FROM events WHERE type = "
                                                 "'replicate.webhook' ORDER BY position")]
    assert sorted(keys) == ["msg_first", "msg_ok0", "msg_ok1", "msg_ok2"]
    assert not conn.execute("SELECT FROM predictions WHERE id = 'p_nul'").fetchall()


def test_a_group_that_times_out_answers_each_webhook_at_once_not_one_retry_after_another(db_url, conn):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "REPLICATE_WEBHOOK_SECRET": SECRET,
                      "DB_STATEMENT_TIMEOUT_MS": 1000})
    try:
        job, first = a_job_and_its_first_webhook(conn)
        rest = [(*processing(f"p{i}", f"msg_t{i}"), f"?job={job}&step=1") for i in range(5)]
        started = time.monotonic()
        responses = deliver_while_held(app, db_url, conn, job, first, rest, release=False)
        elapsed = time.monotonic() - started
    finally:
        app.extensions["db_pool"].close()
    assert [r.status_code for r in responses] == [500] * 6
    assert all("statement timeout" in r.get_json()["message"] for r in responses)
    # the first alone, then the five together: two timeouts, not six
    assert elapsed < 4.5, elapsed
    recorded = conn.execute("SELECT count(*) AS n FROM events WHERE type = 'replicate.webhook'").fetchone()
    assert recorded["n"] == 0
