from __future__ import annotations

import threading

import psycopg
import pytest

from service import db, events
from service.errors import InvalidEvent
from tests.conftest import new_job_id, payload
from tests.workload import LIFECYCLE, bodies, create_job, prediction_row, webhook


def count(conn, table: str = "events") -> int:
    return conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]


@pytest.mark.parametrize("statement", [
    "UPDATE events SET type = 'job.canceled'",
    "UPDATE events SET data = '{}' WHERE position = 1",
    "DELETE FROM events",
    "DELETE FROM events WHERE position = 1",
    "TRUNCATE events",
    "TRUNCATE events CASCADE",
])
def test_events_are_immutable_for_the_owner(conn, statement):
    create_job(conn, new_job_id())
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="events is append-only"):
        conn.execute(statement)
    assert count(conn) == 1


@pytest.mark.parametrize("statement", ["UPDATE events SET type = 'job.canceled'",
                                       "DELETE FROM events", "TRUNCATE events"])
def test_the_application_role_may_only_select_and_insert(conn, statement):
    create_job(conn, new_job_id())
    with conn.transaction():
        conn.execute("SET LOCAL ROLE app_user")
        assert conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == 1
        conn.execute("INSERT INTO events (event_key, stream, type, data) "
                     "VALUES ('k', 's', 'job.canceled', '{}')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            with conn.transaction():
                conn.execute(statement)


def test_a_duplicate_key_records_nothing_and_returns_the_original_position(conn):
    job = new_job_id()
    create_job(conn, job)
    body = bodies(LIFECYCLE[:2], "p1")[1]
    first = webhook(conn, job, body, key="msg_1")
    before = conn.execute("SELECT * FROM jobs").fetchone(), prediction_row(conn, "p1")
    other = dict(body, status="succeeded")  # a different body under the same webhook-id
    again = webhook(conn, job, other, key="msg_1")
    assert again == events.Appended(first.position, duplicate=True)
    assert first.duplicate is False
    assert count(conn) == 2
    assert (conn.execute("SELECT * FROM jobs").fetchone(), prediction_row(conn, "p1")) == before


def test_sixteen_connections_appending_one_key_record_exactly_one_event(db_url, conn):
    job = new_job_id()
    create_job(conn, job)
    body = payload("succeeded_sdxl_output_list_with_logs")
    barrier = threading.Barrier(16)
    results: list[events.Appended] = []

    def deliver() -> None:
        with db.connect(db_url, autocommit=True) as own:
            barrier.wait()
            results.append(webhook(own, job, body, key="msg_race"))

    threads = [threading.Thread(target=deliver) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16
    assert len({r.position for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert conn.execute("SELECT count(*) AS n FROM events WHERE event_key = 'msg_race'").fetchone()["n"] == 1
    assert conn.execute("SELECT event_count FROM predictions").fetchone()["event_count"] == 1
    assert conn.execute("SELECT event_count FROM job_activity").fetchone()["event_count"] == 2


def test_an_unknown_event_type_is_refused_and_nothing_is_stored(conn):
    with pytest.raises(InvalidEvent, match="events_type_known"):
        events.append(conn, key="k", stream=new_job_id(), type="job.exploded", data={})
    assert count(conn) == 0


def test_a_malformed_timestamp_is_refused_and_nothing_is_stored(conn):
    body = dict(payload("processing_sdxl_partial_logs"), created_at="yesterday-ish")
    with pytest.raises(InvalidEvent, match="timestamp"):
        webhook(conn, None, body, key="msg_bad_time")
    assert count(conn) == 0
    assert count(conn, "predictions") == 0


def test_a_webhook_for_an_unknown_prediction_is_kept_as_an_orphan(conn):
    body = payload("succeeded_flux_pro_single_string_output_image_count")
    appended = webhook(conn, None, body, key="msg_orphan")
    assert appended.duplicate is False
    row = conn.execute("SELECT * FROM predictions").fetchone()
    assert row["id"] == body["id"] and row["job_id"] is None and row["status"] == "succeeded"
    assert row["output_urls"] == [body["output"]]
    event = conn.execute("SELECT stream FROM events").fetchone()
    assert event["stream"] == body["id"]
    assert count(conn, "jobs") == 0


def test_a_late_processing_webhook_does_not_regress_a_finished_prediction(conn):
    job = new_job_id()
    create_job(conn, job)
    start, early, later, done = bodies(LIFECYCLE, "p1")
    for key, body in [("m4", done), ("m2", early), ("m1", start), ("m3", later)]:
        webhook(conn, job, body, key=key)
    row = prediction_row(conn, "p1")
    assert row["status"] == "succeeded"
    assert row["logs_length"] == len(done["logs"])
    assert row["output_urls"] == done["output"]
    assert row["metrics"] == done["metrics"]


def test_a_poll_after_data_removal_does_not_erase_logs_or_outputs(conn):
    job = new_job_id()
    create_job(conn, job)
    done = bodies(["succeeded_sdxl_output_list_with_logs"], "p1")[0]
    removed = dict(done, output=None, logs="", data_removed=True, input={})
    webhook(conn, job, done, key="m1")
    events.append(conn, key="polled:p1:succeeded", stream=job, type="replicate.polled",
                  data=removed, metadata={})
    row = prediction_row(conn, "p1")
    assert row["output_urls"] == done["output"]
    assert row["logs_length"] == len(done["logs"])
    assert row["data_removed"] is True


@pytest.mark.parametrize("name,urls", [
    ("succeeded_sdxl_polled_list_output", 1),
    ("succeeded_flux_pro_single_string_output_image_count", 1),
    ("succeeded_default_example_nested_list_output", None),
    ("succeeded_default_example_output_dict", None),
    ("succeeded_default_example_list_of_file_objects_negative_predict_time", None),
    ("succeeded_default_example_llm_token_list", 0),
])
def test_output_urls_are_found_in_every_output_shape(conn, name, urls):
    body = payload(name)
    webhook(conn, None, body, key=f"msg_{name}")
    found = conn.execute("SELECT output_urls FROM predictions").fetchone()["output_urls"]
    text = str(body["output"])
    expected = text.count("https://") + text.count("http://") + text.count("data:")
    assert len(found) == (expected if urls is None else urls)
    assert all(u.startswith(("https://", "http://", "data:")) for u in found)


def test_a_job_moves_through_its_statuses(conn):
    job = new_job_id()
    create_job(conn, job)

    def status() -> str:
        return conn.execute("SELECT status FROM jobs").fetchone()["status"]

    assert status() == "pending"
    start, early, _, done = bodies(LIFECYCLE, "p1")
    events.append(conn, key=f"submitted:{job}:1:0", stream=job, type="prediction.submitted",
                  data={"step": 1, "index": 0, "prediction": start})
    assert status() == "queued"
    webhook(conn, job, early, key="m2")
    assert status() == "running"
    webhook(conn, job, done, key="m4")
    assert status() == "processing"
    for i, url in enumerate(done["output"]):
        events.append(conn, key=f"processed:p1:{i}", stream=job, type="output.processed",
                      data={"prediction_id": "p1", "index": i, "source_url": url,
                            "url": f"/files/jobs/{job}/p1-{i}.png", "width": 2048, "height": 2048})
    row = conn.execute("SELECT * FROM jobs").fetchone()
    assert row["status"] == "completed"
    assert row["outputs_processed"] == len(done["output"])
    assert row["outputs"][0]["width"] == 2048
    assert row["completed_at"] is not None and row["started_at"] is not None
    activity = conn.execute("SELECT * FROM job_activity").fetchone()
    assert activity["event_count"] == 2 + 2 + len(done["output"])
    assert activity["last_position"] == conn.execute("SELECT max(position) AS p FROM events").fetchone()["p"]


def test_a_failed_and_a_canceled_job(conn):
    failed_job, canceled_job = new_job_id(), new_job_id()
    create_job(conn, failed_job)
    create_job(conn, canceled_job)
    webhook(conn, failed_job, bodies(["failed_flux11pro_nsfw_with_traceback_logs"], "pf")[0], key="mf")
    webhook(conn, canceled_job, bodies(["starting_sdxl_create_response"], "pc")[0], key="mc")
    events.append(conn, key=f"canceled:{canceled_job}", stream=canceled_job, type="job.canceled",
                  data={"reason": "user"})
    rows = {str(r["id"]): r for r in conn.execute("SELECT * FROM jobs")}
    assert rows[failed_job]["status"] == "failed"
    assert "NSFW" in rows[failed_job]["error"]
    assert rows[canceled_job]["status"] == "canceled"
    assert rows[canceled_job]["completed_at"] == rows[canceled_job]["canceled_at"]
