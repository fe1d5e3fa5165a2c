"""The jobs HTTP API against a real PostgreSQL: create, read, list, events, cancel, auth, OpenAPI."""

from __future__ import annotations

import copy
import json
import time
import uuid

import pytest
from openapi_spec_validator import validate as validate_openapi

from service import create_app
from tests.conftest import new_job_id
from tests.workload import (
    CANCELED,
    LIFECYCLE,
    bodies,
    create_job,
    process_output,
    submit,
    webhook,
)

VERSION = "39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b"
BODY = {"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse"}}


def written(conn) -> tuple[int, int]:
    """How many events and tasks the database holds."""
    row = conn.execute("SELECT (SELECT count(*) FROM events) AS e, (SELECT count(*) FROM tasks) AS t")
    return tuple(row.fetchone().values())


def post(client, body, **headers):
    return client.post("/api/jobs", json=body, headers=headers)


def running_job(conn, job: str, prediction: str = "p-run", count: int = 1) -> None:
    """A job whose first prediction Replicate is processing."""
    create_job(conn, job, count=count)
    first, second = bodies(LIFECYCLE[:2], prediction)
    submit(conn, job, first)
    webhook(conn, job, second, key=f"msg_{prediction}_1")


def completed_job(conn, job: str, prediction: str = "p-done", count: int = 1) -> None:
    """A job whose first prediction succeeded and whose one output was processed."""
    create_job(conn, job, count=count)
    states = bodies(LIFECYCLE, prediction)
    submit(conn, job, states[0])
    webhook(conn, job, states[-1], key=f"msg_{prediction}_3")
    process_output(conn, job, prediction, 0, width=768, height=1024)


# --- create ---------------------------------------------------------------------------------

def test_create_records_the_job_and_queues_one_submission_per_prediction(client, conn):
    response = post(client, {**BODY, "count": 3, "aspect_ratio": "3:4", "metadata": {"user": 7}})
    assert response.status_code == 201
    job = response.get_json()
    assert response.headers["Location"] == f"/api/jobs/{job['id']}"
    assert job["status"] == "pending" and job["model"] == "stability-ai/sdxl"
    assert job["aspect_ratio"] == "3:4" and job["postprocess"] == {"mode": "auto"}
    assert job["progress"] == {"total": 3, "succeeded": 0, "failed": 0, "processed": 0}
    assert job["predictions"] == [] and job["outputs"] == [] and job["metadata"] == {"user": 7}
    row = conn.execute("SELECT status, predictions_expected FROM jobs WHERE id = %s", (job["id"],)).fetchone()
    assert row == {"status": "pending", "predictions_expected": 3}
    tasks = conn.execute("SELECT kind, task_key, job_id::text, payload FROM tasks ORDER BY id").fetchall()
    assert tasks == [{"kind": "submit_prediction", "task_key": f"submit:{job['id']}:1:{i}",
                      "job_id": job["id"], "payload": {"step": 1, "index": i}} for i in range(3)]


def test_a_new_job_id_is_a_uuidv7_whose_order_is_creation_order(client):
    """Job ids begin with their creation time in milliseconds (RFC 9562's UUIDv7), so the
    indexes keyed by them grow at one edge; the rest is random. An Idempotency-Key's job keeps
    its derived (v5) id: the same key must name the same job whenever it comes again."""
    before = time.time_ns() // 1_000_000
    first = uuid.UUID(post(client, BODY).get_json()["id"])
    time.sleep(0.002)
    second = uuid.UUID(post(client, BODY).get_json()["id"])
    after = time.time_ns() // 1_000_000
    assert first.version == second.version == 7 and first.variant == uuid.RFC_4122
    assert before <= first.int >> 80 < second.int >> 80 <= after
    assert str(first) < str(second)  # text order too: what jobs_pkey sorts by is the uuid's bytes
    keyed = uuid.UUID(post(client, BODY, **{"Idempotency-Key": "k-v7"}).get_json()["id"])
    assert keyed.version == 5


def test_create_returns_the_same_shape_as_get(client):
    created = post(client, BODY).get_json()
    assert client.get(f"/api/jobs/{created['id']}").get_json() == created


@pytest.mark.parametrize("fields,expected", [
    ({}, "1:1"),
    ({"input": {"prompt": "x", "aspect_ratio": "9:16"}}, "9:16"),
    ({"input": {"prompt": "x", "aspect_ratio": "match_input_image"}}, "1:1"),
    ({"input": {"prompt": "x", "aspect_ratio": "9:16"}, "aspect_ratio": "1:1"}, "1:1"),
])
def test_aspect_ratio_defaults_to_the_inputs_when_that_is_a_ratio(client, fields, expected):
    assert post(client, {**BODY, **fields}).get_json()["aspect_ratio"] == expected


@pytest.mark.parametrize("target", [
    {"version": VERSION},
    {"version": f"stability-ai/sdxl:{VERSION}"},
    {"deployment": "acme/my-app-image-generator"},
])
def test_a_job_may_name_a_version_or_a_deployment_instead(client, target):
    job = post(client, {"input": {"prompt": "x"}, **target}).get_json()
    assert {k: job[k] for k in target} == target


def test_then_and_postprocess_are_stored_with_the_job(client, conn):
    then = {"model": "nightmareai/real-esrgan", "input": {"image": "{{outputs[0]}}", "scale": 2}}
    body = {**BODY, "postprocess": {"mode": "resize", "long_side": 1536}, "then": then}
    job = post(client, body).get_json()
    assert job["postprocess"] == {"mode": "resize", "long_side": 1536}
    row = conn.execute("SELECT next_step FROM jobs WHERE id = %s", (job["id"],)).fetchone()
    assert row["next_step"] == then


def test_an_idempotency_key_makes_a_repeat_return_the_same_job(client, conn):
    first = post(client, {**BODY, "count": 2}, **{"Idempotency-Key": "order-42"})
    before = written(conn)
    again = post(client, {**BODY, "count": 2}, **{"Idempotency-Key": "order-42"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert written(conn) == before
    other = post(client, {**BODY, "count": 2}, **{"Idempotency-Key": "order-43"})
    assert other.status_code == 201 and other.get_json()["id"] != first.get_json()["id"]


def test_an_idempotency_key_reused_for_another_request_is_refused(client, conn):
    post(client, BODY, **{"Idempotency-Key": "order-42"})
    before = written(conn)
    response = post(client, {**BODY, "count": 5}, **{"Idempotency-Key": "order-42"})
    assert response.status_code == 422
    assert "Idempotency-Key" in response.get_json()["fields"]
    assert written(conn) == before


BIG = "x" * (256 * 1024)
DEEP: dict = {}
for _ in range(70):
    DEEP = {"x": DEEP}
INVALID = [  # (what the body changes, the field the 422 names)
    ({"model": None}, "model"),
    ({"version": VERSION}, "version"),
    ({"model": "sdxl"}, "model"),
    ({"model": "stability-ai/sdxl/extra"}, "model"),
    ({"model": None, "version": "abc123"}, "version"),
    ({"model": None, "version": "stability-ai/sdxl:" + "a" * 63}, "version"),
    ({"model": None, "version": VERSION.upper()}, "version"),
    ({"model": None, "deployment": "just-a-name"}, "deployment"),
    ({"model": 42}, "model"),
    ({"input": None}, "input"),
    ({"input": "a lighthouse"}, "input"),
    ({"input": [1, 2]}, "input"),
    ({"input": {"prompt": BIG}}, "input"),
    ({"input": {"prompt": "{{outputs[0]}}"}}, "input"),
    ({"input": {"prompt": "a\u0000b"}}, "input"),
    ({"input": {"a\ud800": 1}}, "input"),
    ({"input": DEEP}, "input"),
    ({"aspect_ratio": "0:1"}, "aspect_ratio"),
    ({"aspect_ratio": "101:1"}, "aspect_ratio"),
    ({"aspect_ratio": "16x9"}, "aspect_ratio"),
    ({"aspect_ratio": "1:1:1"}, "aspect_ratio"),
    ({"aspect_ratio": 1.5}, "aspect_ratio"),
    ({"count": 0}, "count"),
    ({"count": 51}, "count"),
    ({"count": "3"}, "count"),
    ({"count": 2.0}, "count"),
    ({"count": True}, "count"),
    ({"postprocess": {"mode": "zoom"}}, "postprocess.mode"),
    ({"postprocess": {"mode": "resize", "width": 8}}, "postprocess.width"),
    ({"postprocess": {"mode": "resize", "height": 100_000}}, "postprocess.height"),
    ({"postprocess": {"mode": "resize", "long_side": 1024, "width": 512}}, "postprocess.long_side"),
    ({"postprocess": {"mode": "none", "width": 512}}, "postprocess.width"),
    ({"postprocess": {"scale": 2}}, "postprocess.scale"),
    ({"postprocess": "auto"}, "postprocess"),
    ({"then": {"input": {"image": "{{outputs[0]}}"}}}, "then.model"),
    ({"then": {"model": "a/b"}}, "then.input"),
    ({"then": {"model": "a/b", "input": {"image": "{{output[0]}}"}}}, "then.input"),
    ({"then": {"model": "a/b", "input": {"image": "{{outputs[first]}}"}}}, "then.input"),
    ({"then": {"model": "a/b", "deployment": "c/d", "input": {}}}, "then.deployment"),
    ({"then": {"model": "a/b", "input": {}, "count": 2}}, "then.count"),
    ({"metadata": {"note": "y" * 16 * 1024}}, "metadata"),
    ({"metadata": ["tag"]}, "metadata"),
    ({"metadata": {"note": "\udfff"}}, "metadata"),
    ({"priority": "high"}, "priority"),
]


@pytest.mark.parametrize("change,field", INVALID, ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)])
def test_every_invalid_field_is_422_naming_it_and_writes_nothing(client, conn, change, field):
    body = {k: v for k, v in {**copy.deepcopy(BODY), **change}.items() if v is not None}
    before = written(conn)
    response = post(client, body)
    assert response.status_code == 422, response.get_json()
    error = response.get_json()
    assert error["error"] == "invalid_request" and field in error["message"]
    assert field in error["fields"] and all(isinstance(m, str) for m in error["fields"][field])
    assert written(conn) == before


def test_all_invalid_fields_are_named_at_once(client):
    fields = post(client, {**BODY, "count": 0, "aspect_ratio": "x", "extra": 1}).get_json()["fields"]
    assert set(fields) == {"count", "aspect_ratio", "extra"}


@pytest.mark.parametrize("key", ["k" * 201, "", "caf\u00e9"])
def test_an_idempotency_key_not_of_1_to_200_printable_ascii_characters_is_422(client, conn, key):
    response = post(client, BODY, **{"Idempotency-Key": key})
    assert response.status_code == 422 and "Idempotency-Key" in response.get_json()["fields"]
    assert written(conn) == (0, 0)


@pytest.mark.parametrize("data", [b"", b"{not json", b"[1, 2]", b'"text"', b"null",
                                  b'{"model": "a/b", "input": {"x": NaN}}', b'{"input": {"x": 1e400}}',
                                  b"[" * 100_000, b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_400(client, conn, data):
    response = client.post("/api/jobs", data=data, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_json"
    assert written(conn) == (0, 0)


def test_a_body_over_a_megabyte_is_413(client, conn):
    response = client.post("/api/jobs", data=b" " * (1024 * 1024 + 1), content_type="application/json")
    assert response.status_code == 413 and response.is_json
    assert written(conn) == (0, 0)


# --- read -----------------------------------------------------------------------------------

def test_get_shows_predictions_and_outputs_from_the_projection(client, conn):
    job = new_job_id()
    completed_job(conn, job, "p-done", count=2)
    running = bodies(LIFECYCLE[:2], "p-run")
    submit(conn, job, running[0], n=2)
    webhook(conn, job, running[1], key="msg_p-run_1")
    body = client.get(f"/api/jobs/{job}").get_json()
    assert body["id"] == job and body["status"] == "running"
    assert body["progress"] == {"total": 2, "succeeded": 1, "failed": 0, "processed": 1}
    by_id = {p["id"]: p for p in body["predictions"]}
    assert set(by_id) == {"p-done", "p-run"}
    done = by_id["p-done"]
    assert set(done) == {"id", "step", "status", "error", "metrics", "created_at", "started_at",
                         "completed_at", "superseded"}
    assert done["superseded"] is False
    assert (done["step"], done["status"], done["metrics"]) == (1, "succeeded", {"predict_time": 11.859389})
    assert done["created_at"] == "2023-08-16T18:57:08.360785+00:00"  # earliest report wins
    assert by_id["p-run"]["status"] == "processing" and by_id["p-run"]["completed_at"] is None
    assert body["outputs"] == [{
        "prediction_id": "p-done", "step": 1, "index": 0, "width": 768, "height": 1024,
        "source_url": "https://replicate.delivery/p-done/out-0.png", "url": "file:///outputs/p-done/0.png"}]
    assert set(body) == {"id", "status", "model", "version", "deployment", "aspect_ratio", "postprocess",
                         "progress", "predictions", "outputs", "error", "metadata", "created_at",
                         "started_at", "completed_at", "updated_at", "steps", "owner", "deadline", "retries",
                         "cost"}
    assert body["owner"] is None
    assert (body["deadline"], body["retries"]) == (None, 0)
    # p-done's predict_time; no REPLICATE_PRICES, so no dollars
    assert body["cost"] == {"compute_seconds": 11.859389, "predict_time_anomalies": 0,
                            "estimated_dollars": None, "unpriced_predictions": 1}
    assert body["steps"] == [{"step": 1, "target": body["model"], "total": 2, "succeeded": 1, "failed": 0,
                              "processed": 1}]


def test_a_failed_job_shows_its_error(client, conn):
    job = new_job_id()
    create_job(conn, job)
    failed = bodies(["starting_sdxl_create_response", "failed_flux11pro_nsfw_with_traceback_logs"], "p-f")
    submit(conn, job, failed[0])
    webhook(conn, job, failed[1], key="msg_p-f_1")
    body = client.get(f"/api/jobs/{job}").get_json()
    assert body["status"] == "failed" and body["error"] and body["completed_at"]
    assert body["predictions"][0]["error"] == body["error"]


@pytest.mark.parametrize("path", ["/api/jobs/not-a-uuid", f"/api/jobs/{uuid.uuid4()}",
                                  "/api/jobs/not-a-uuid/events", f"/api/jobs/{uuid.uuid4()}/events"])
def test_an_unknown_or_malformed_job_id_is_404(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


@pytest.mark.parametrize(("method", "path", "message"), [
    ("GET", "/api/jobs/nope", "no job nope"),
    ("GET", "/api/jobs/nope/events", "no job nope"),
    ("POST", "/api/jobs/nope/cancel", "no job nope"),
    ("GET", "/api/nothing", "no such endpoint: GET /api/nothing (the API: /api/openapi.json)"),
    ("DELETE", "/api/jobs/x/y/z", "no such endpoint: DELETE /api/jobs/x/y/z (the API: /api/openapi.json)"),
    ("GET", "/api", "no such endpoint: GET /api (the API: /api/openapi.json)"),
])
def test_an_unknown_api_path_answers_the_apis_json_error(client, method, path, message):
    response = client.open(path, method=method, headers={"Accept": "text/html"})
    assert response.status_code == 404 and response.mimetype == "application/json"
    assert response.get_json() == {"error": "not_found", "message": message}


def test_events_are_listed_in_recording_order(client, conn):
    job = new_job_id()
    completed_job(conn, job)
    events = client.get(f"/api/jobs/{job}/events").get_json()["events"]
    assert [e["type"] for e in events] == ["job.created", "prediction.submitted", "replicate.webhook",
                                          "output.processed"]
    assert [e["position"] for e in events] == sorted(e["position"] for e in events)
    assert set(events[0]) == {"position", "type", "event_key", "recorded_at", "data"}
    assert events[0]["event_key"] == f"created:{job}" and events[0]["data"]["count"] == 1
    assert events[2]["event_key"] == "msg_p-done_3" and events[2]["data"]["status"] == "succeeded"


# --- list -----------------------------------------------------------------------------------

def pages(client, query: str) -> list[list[dict]]:
    out, cursor = [], None
    while True:
        response = client.get(f"/api/jobs?{query}" + (f"&cursor={cursor}" if cursor else ""))
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        out.append(body["jobs"])
        cursor = body["next_cursor"]
        if cursor is None:
            return out


def test_the_list_pages_newest_first_without_gaps_or_duplicates(client, conn):
    jobs = [new_job_id() for _ in range(11)]
    for job in jobs:
        create_job(conn, job)
    # Ties on created_at are broken by id, so a page boundary inside a tie loses nothing.
    conn.execute("UPDATE jobs SET created_at = '2024-01-01T00:00:00Z' WHERE id = ANY(%s::uuid[])",
                 (jobs[3:8],))
    expected = [str(r["id"]) for r in conn.execute("SELECT id FROM jobs ORDER BY created_at DESC, id DESC")]
    got = pages(client, "limit=3")
    assert [len(p) for p in got] == [3, 3, 3, 2]
    assert [j["id"] for p in got for j in p] == expected
    assert "predictions" not in got[0][0] and "progress" in got[0][0]
    assert len(client.get("/api/jobs").get_json()["jobs"]) == 11  # default limit 20


def test_the_list_filters_by_status_and_model(client, conn):
    sdxl = [new_job_id() for _ in range(4)]
    for job in sdxl:
        create_job(conn, job)
    flux = new_job_id()
    create_job(conn, flux, model="black-forest-labs/flux-schnell")
    running = new_job_id()
    running_job(conn, running)

    def ids(query: str) -> set[str]:
        return {j["id"] for p in pages(client, query) for j in p}

    assert ids("status=pending&limit=2") == {*sdxl, flux}
    assert ids("status=running") == {running}
    assert ids("model=black-forest-labs/flux-schnell") == {flux}
    assert ids("model=stability-ai/sdxl&status=pending&limit=1") == set(sdxl)
    assert ids("status=completed") == set()
    assert ids("status=&model=&limit=&cursor=") == {*sdxl, flux, running}


@pytest.mark.parametrize("query,field", [
    ("status=done", "status"), ("limit=0", "limit"), ("limit=101", "limit"), ("limit=ten", "limit"),
    ("cursor=bm9wZQ", "cursor"), ("cursor=%%%", "cursor"), ("model=sdxl", "model"), ("sort=asc", "sort"),
])
def test_invalid_list_parameters_are_422_naming_them(client, query, field):
    response = client.get(f"/api/jobs?{query}")
    assert response.status_code == 422
    assert field in response.get_json()["fields"]


# --- cancel ---------------------------------------------------------------------------------

def test_cancel_records_the_event_and_queues_a_cancel_per_running_prediction(client, conn):
    job = new_job_id()
    running_job(conn, job, "p-run", count=2)
    done = bodies(CANCELED, "p-gone")
    submit(conn, job, done[0], n=2)
    webhook(conn, job, done[1], key="msg_p-gone_1")
    response = client.post(f"/api/jobs/{job}/cancel")
    assert response.status_code == 202
    assert response.get_json()["status"] == "canceled" and response.get_json()["id"] == job
    types = [r["type"] for r in conn.execute("SELECT type FROM events WHERE stream = %s ORDER BY position",
                                             (job,))]
    assert types[-1] == "job.canceled"
    tasks = conn.execute("SELECT kind, task_key, payload FROM tasks").fetchall()
    assert tasks == [{"kind": "cancel_prediction", "task_key": "cancel:p-run",
                      "payload": {"prediction_id": "p-run"}}]
    again = client.post(f"/api/jobs/{job}/cancel")
    assert again.status_code == 202 and written(conn) == (len(types), 1)  # a repeat changes nothing


def test_cancelling_a_finished_job_is_409_and_writes_nothing(client, conn):
    job = new_job_id()
    completed_job(conn, job)
    before = written(conn)
    response = client.post(f"/api/jobs/{job}/cancel")
    assert response.status_code == 409
    assert response.get_json()["error"] == "job_finished"
    assert written(conn) == before


@pytest.mark.parametrize("path", [f"/api/jobs/{uuid.uuid4()}/cancel", "/api/jobs/nope/cancel"])
def test_cancelling_an_unknown_job_is_404(client, path):
    assert client.post(path).status_code == 404


# --- auth -----------------------------------------------------------------------------------

@pytest.fixture
def locked(db_url):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "API_KEYS": ("k0", "k1")})
    yield app.test_client()
    app.extensions["db_pool"].close()


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer ", "k1", "Basic k1", "Bearer k1x"])
def test_with_api_keys_a_request_without_a_right_key_is_401(locked, conn, header):
    headers = {"Authorization": header} if header else {}
    for response in (locked.get("/api/jobs", headers=headers),
                     locked.post("/api/jobs", json=BODY, headers=headers),
                     locked.get(f"/api/jobs/{uuid.uuid4()}/events", headers=headers)):
        assert response.status_code == 401
        assert response.get_json()["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert written(conn) == (0, 0)


def test_with_api_keys_the_right_key_is_let_in(locked):
    assert locked.get("/api/jobs", headers={"Authorization": "Bearer k1"}).status_code == 200
    assert locked.get("/api/jobs", headers={"Authorization": "bearer k0"}).status_code == 200
    created = locked.post("/api/jobs", json=BODY, headers={"Authorization": "Bearer k1"})
    assert created.status_code == 201


def test_without_api_keys_no_key_is_needed_and_openapi_is_always_public(client, locked):
    assert client.get("/api/jobs").status_code == 200
    assert locked.get("/api/openapi.json").status_code == 200


# --- OpenAPI --------------------------------------------------------------------------------

def test_openapi_document_is_valid_and_lists_every_path(client):
    doc = client.get("/api/openapi.json").get_json()
    validate_openapi(doc)
    assert doc["openapi"].startswith("3.") and doc["info"]["title"]
    assert set(doc["paths"]) == {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events",
                                 "/api/jobs/{job_id}/cancel", "/api/jobs/{job_id}/retry", "/api/openapi.json",
                                 "/webhooks/replicate", "/healthz"}
    assert set(doc["paths"]["/api/jobs"]) == {"get", "post"}
    assert set(doc["paths"]["/webhooks/replicate"]["post"]["responses"]) == {"200", "400", "401", "413"}
    request_schema = doc["components"]["schemas"]["JobRequest"]
    assert {"model", "version", "deployment", "input", "aspect_ratio", "count", "postprocess", "then",
            "metadata"} <= set(request_schema["properties"])
    assert request_schema["properties"]["count"]["maximum"] == 50
    params = {p["name"] for p in doc["paths"]["/api/jobs"]["get"]["parameters"]}
    assert params == {"status", "model", "limit", "cursor"}
    assert json.dumps(doc)  # plain JSON throughout
