"""The history views (sql/history_views.sql) over a known workload built through the
real append path: every expected number below follows from the timestamps in the events."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

import pytest

from tests.conftest import new_job_id
from tests.workload import (
    CANCELED,
    FAILED,
    LIFECYCLE,
    bodies,
    cancel_job,
    create_job,
    job_created_at,
    polled,
    process_output,
    submit,
    timed,
    webhook,
)

SDXL = "stability-ai/sdxl"
FLUX = "black-forest-labs/flux-schnell"
VERSION = "7762fd07cf82c948538e41f63f77d685e02b063e37e496e96eefd46c929f9bdc"
NEGATIVE = "succeeded_default_example_list_of_file_objects_negative_predict_time"


@dataclass
class Workload:
    jobs: dict[str, str] = field(default_factory=dict)  # name -> job id
    created: dict[str, datetime] = field(default_factory=dict)

    def start(self, conn, name: str, **fields) -> tuple[str, datetime]:
        job = new_job_id()
        create_job(conn, job, **fields)
        self.jobs[name] = job
        self.created[name] = job_created_at(conn, job)
        return job, self.created[name]


def completed_one(conn, w: Workload) -> None:
    """SDXL, one prediction: queued 5 s, ran 15 s, predict_time 12.5 s, one output.
    One state arrives twice under different webhook ids, one webhook is retried."""
    job, t = w.start(conn, "completed")
    starting, partial, more, done = bodies(LIFECYCLE, "p-completed")
    submit(conn, job, timed(starting, t))
    webhook(conn, job, timed(partial, t, started=5), key="msg_c1")
    webhook(conn, job, timed(more, t, started=5), key="msg_c2")
    webhook(conn, job, timed(more, t, started=5), key="msg_c2_resent")  # same body, new id
    webhook(conn, job, timed(partial, t, started=5), key="msg_c1")  # a retry: not recorded
    polled(conn, job, timed(done, t, started=5, completed=20, predict_time=12.5), key="poll_c")
    process_output(conn, job, "p-completed", 0)


def completed_two(conn, w: Workload) -> None:
    """SDXL, two predictions: first starts at 2 s, last completes at 40 s; 10 + 20 s predict."""
    job, t = w.start(conn, "two", count=2)
    for n, (name, started, completed, predict) in enumerate([
        ("succeeded_sdxl_output_list_with_logs", 2, 30, 10),
        ("succeeded_sdxl_2024_list_output_nanosecond_timestamps", 3, 40, 20),
    ], start=1):
        pid = f"p-two-{n}"
        starting, done = bodies([LIFECYCLE[0], name], pid)
        submit(conn, job, timed(starting, t), n=n)
        webhook(conn, job, timed(done, t, started=started, completed=completed, predict_time=predict),
                key=f"msg_two_{n}")
        process_output(conn, job, pid, 0, width=768, height=1024, size=300)


def failed(conn, w: Workload) -> None:
    """SDXL, NSFW failure: started at 1 s, failed at 7 s, real predict_time kept."""
    job, t = w.start(conn, "failed")
    starting, done = bodies(FAILED, "p-failed")
    submit(conn, job, timed(starting, t))
    webhook(conn, job, timed(done, t, started=1, completed=7), key="msg_failed")


def canceled(conn, w: Workload) -> None:
    """SDXL, canceled by us before Replicate started it."""
    job, t = w.start(conn, "canceled")
    submit(conn, job, timed(bodies(CANCELED, "p-canceled")[0], t))
    cancel_job(conn, job, reason="user asked")


def flux(conn, w: Workload) -> None:
    """Two FLUX jobs. The first carries Replicate's real negative predict_time and a
    started_at one second before our created_at (clocks disagree): both become NULL."""
    job, t = w.start(conn, "negative", model=FLUX)
    (done,) = bodies([NEGATIVE], "p-negative")
    submit(conn, job, timed(bodies(LIFECYCLE[:1], "p-negative")[0], t))
    webhook(conn, job, timed(done, t, started=-1, completed=9), key="msg_negative")
    process_output(conn, job, "p-negative", 0)
    job, t = w.start(conn, "flux", model=FLUX, aspect_ratio="9:16")
    (done,) = bodies(["succeeded_flux_pro_single_string_output_image_count"], "p-flux")
    submit(conn, job, timed(bodies(LIFECYCLE[:1], "p-flux")[0], t))
    webhook(conn, job, timed(done, t, started=1, completed=4, predict_time=3), key="msg_flux")
    process_output(conn, job, "p-flux", 0, width=720, height=1280)


def orphans(conn, w: Workload) -> None:
    """A job named only by version, never submitted; two webhooks no job claims."""
    w.start(conn, "pending", model=None, version=VERSION)
    (body,) = bodies(LIFECYCLE[1:2], "p-orphan")
    webhook(conn, None, body, key="msg_orphan")
    w.jobs["unknown"] = new_job_id()
    (body,) = bodies(LIFECYCLE[3:4], "p-unknown")
    webhook(conn, w.jobs["unknown"], body, key="msg_unknown")


@pytest.fixture
def w(conn) -> Workload:
    workload = Workload()
    for build in (completed_one, completed_two, failed, canceled, flux, orphans):
        build(conn, workload)
    return workload


def history(conn, job: str) -> dict:
    return conn.execute("SELECT * FROM job_history WHERE id = %s", (job,)).fetchone()


def pick(row: dict, *columns: str) -> tuple:
    return tuple(row[c] for c in columns)


def seconds(n: float) -> timedelta:
    return timedelta(seconds=n)


def test_job_history_durations_come_from_the_event_timestamps(conn, w):
    row = history(conn, w.jobs["completed"])
    t = w.created["completed"]
    assert (row["model"], row["aspect_ratio"], row["status"]) == (SDXL, "1:1", "completed")
    assert (row["created_at"], row["started_at"], row["completed_at"]) == (t, t + seconds(5), t + seconds(20))
    assert (row["queued_duration"], row["run_duration"], row["total_duration"]) == (
        seconds(5), seconds(15), seconds(20))
    assert (row["queued_seconds"], row["run_seconds"], row["total_seconds"]) == (5, 15, 20)
    assert (row["predict_time"], row["predict_time_seconds"]) == (seconds(12.5), Decimal("12.5"))
    assert (row["predictions_expected"], row["predictions_succeeded"], row["predictions_failed"]) == (1, 1, 0)
    assert (row["outputs_expected"], row["outputs"], row["error"]) == (1, 1, None)
    assert row["event_count"] == 7  # the retried msg_c1 is not an event


def test_job_history_sums_predict_time_over_predictions_and_spans_them(conn, w):
    row = history(conn, w.jobs["two"])
    assert (row["queued_seconds"], row["run_seconds"], row["total_seconds"]) == (2, 38, 40)
    assert row["predict_time_seconds"] == 30
    assert pick(row, "predictions_expected", "predictions_submitted", "predictions_succeeded") == (2, 2, 2)
    assert (row["outputs_expected"], row["outputs"]) == (2, 2)


def test_job_history_of_failed_and_canceled_jobs(conn, w):
    row = history(conn, w.jobs["failed"])
    assert (row["status"], row["error"]) == ("failed", "Error generating image: NSFW content detected.")
    assert (row["queued_seconds"], row["run_seconds"], row["total_seconds"]) == (1, 6, 7)
    assert row["predict_time_seconds"] == Decimal("5.984336918")
    assert (row["predictions_succeeded"], row["predictions_failed"], row["outputs"]) == (0, 1, 0)

    row = history(conn, w.jobs["canceled"])
    canceled_at = conn.execute("SELECT recorded_at FROM events WHERE event_key = %s",
                               (f"canceled:{w.jobs['canceled']}",)).fetchone()["recorded_at"]
    assert (row["status"], row["started_at"], row["completed_at"]) == ("canceled", None, canceled_at)
    assert (row["queued_duration"], row["run_duration"]) == (None, None)
    assert row["total_duration"] == canceled_at - w.created["canceled"]
    assert row["predict_time_seconds"] is None


def test_negative_predict_time_and_negative_durations_are_unknown(conn, w):
    row = history(conn, w.jobs["negative"])
    assert row["status"] == "completed"
    assert pick(row, "predict_time", "predict_time_seconds", "predict_time_anomalies") == (None, None, 1)
    assert row["queued_duration"] is None  # Replicate's clock says it started before we created it
    assert (row["run_seconds"], row["total_seconds"]) == (10, 9)
    assert history(conn, w.jobs["flux"])["predict_time_anomalies"] == 0


def test_job_history_names_a_job_by_version_when_it_has_no_model(conn, w):
    row = history(conn, w.jobs["pending"])
    assert (row["model"], row["status"], row["predictions_submitted"]) == (VERSION, "pending", 0)
    assert pick(row, "total_duration", "predict_time_seconds", "predict_time_anomalies") == (None, None, 0)
    assert conn.execute("SELECT count(*) AS n FROM job_history").fetchone()["n"] == 7


def test_job_timeline_reads_like_a_story(conn, w):
    job = w.jobs["completed"]
    rows = conn.execute("SELECT * FROM job_timeline WHERE stream = %s", (job,)).fetchall()
    assert [(r["seq"], r["type"], r["prediction_id"], r["prediction_status"], r["summary"], r["is_repeat"])
            for r in rows] == [
        (1, "job.created", None, None, "created: stability-ai/sdxl, 1 prediction, 1:1", False),
        (2, "prediction.submitted", "p-completed", "starting",
         "submitted step 1: p-completed (starting)", False),
        (3, "replicate.webhook", "p-completed", "processing", "webhook: processing, 226 B of logs", False),
        (4, "replicate.webhook", "p-completed", "processing", "webhook: processing, 1.8 KB of logs", False),
        (5, "replicate.webhook", "p-completed", "processing", "webhook: processing, 1.8 KB of logs", True),
        (6, "replicate.polled", "p-completed", "succeeded",
         "polled: succeeded, 1 output, 3.1 KB of logs", False),
        (7, "output.processed", "p-completed", None, "output 0 processed 1024x1024, 1.5 MB", False),
    ]
    positions = [r["position"] for r in rows]
    assert positions == sorted(positions)
    assert [r["event_key"] for r in rows[2:6]] == ["msg_c1", "msg_c2", "msg_c2_resent", "poll_c"]
    assert rows[4]["repeat_of"] == rows[3]["position"] and rows[3]["repeat_of"] is None
    assert all(str(r["job_id"]) == job for r in rows)
    assert rows[0]["elapsed"] == timedelta(0)
    assert [r["elapsed"] for r in rows] == [r["recorded_at"] - rows[0]["recorded_at"] for r in rows]
    assert rows[6]["data"]["width"] == 1024 and rows[2]["metadata"]["source"] == "test"


def test_job_timeline_summarises_failures_cancels_and_orphans(conn, w):
    def summaries(stream: str) -> list[str]:
        return [r["summary"] for r in conn.execute(
            "SELECT summary FROM job_timeline WHERE stream = %s", (stream,))]

    assert summaries(w.jobs["failed"])[-1] == (
        "webhook: failed (Error generating image: NSFW content detected.), 916 B of logs")
    assert summaries(w.jobs["canceled"])[-1] == "canceled: user asked"
    assert summaries(w.jobs["flux"])[0] == "created: black-forest-labs/flux-schnell, 1 prediction, 9:16"
    assert summaries(w.jobs["two"])[1:3] == [
        "submitted step 1: p-two-1 (starting)", "webhook: succeeded, 1 output, 1.6 KB of logs"]
    orphan = conn.execute("SELECT * FROM job_timeline WHERE stream = 'p-orphan'").fetchone()
    assert (orphan["job_id"], orphan["seq"], orphan["summary"]) == (
        None, 1, "webhook: processing, 226 B of logs")
    # Filtering on job_id gives the same rows as on stream.
    by_job = conn.execute("SELECT position FROM job_timeline WHERE job_id = %s", (w.jobs["two"],)).fetchall()
    assert len(by_job) == 7


def test_repeats_are_only_identical_bodies_of_one_stream(conn, w):
    rows = conn.execute("SELECT stream, event_key FROM job_timeline WHERE is_repeat").fetchall()
    assert [(r["stream"], r["event_key"]) for r in rows] == [(w.jobs["completed"], "msg_c2_resent")]


def test_model_daily_summary(conn, w):
    days = {conn.execute("SELECT (%s::timestamptz AT TIME ZONE 'UTC')::date AS d", (t,)).fetchone()["d"]
            for t in w.created.values()}
    if len(days) > 1:
        pytest.skip("the workload straddled midnight UTC")
    rows = {r["model"]: r for r in conn.execute("SELECT * FROM model_daily_summary")}
    assert set(rows) == {SDXL, FLUX, VERSION}
    assert {r["day"] for r in rows.values()} == days

    sdxl = rows[SDXL]
    assert pick(sdxl, "jobs", "completed", "failed", "canceled", "unfinished") == (4, 2, 1, 1, 0)
    assert sdxl["success_rate"] == Decimal("0.5")
    # completed totals 20 and 40 s; predict_time 12.5 and 30 s (linear interpolation)
    assert (sdxl["p50_total_seconds"], sdxl["p95_total_seconds"]) == (30, 39)
    assert (sdxl["p50_predict_seconds"], sdxl["p95_predict_seconds"]) == (Decimal("21.25"), Decimal("29.125"))
    assert sdxl["predict_seconds_total"] == Decimal("48.484336918")  # the failed job's GPU time counts
    assert sdxl["outputs"] == 3

    flux_row = rows[FLUX]
    assert (flux_row["jobs"], flux_row["completed"], flux_row["success_rate"]) == (2, 2, 1)
    assert (flux_row["p50_total_seconds"], flux_row["p95_total_seconds"]) == (Decimal("6.5"), Decimal("8.75"))
    # the negative predict_time is left out, not averaged in
    assert (flux_row["p50_predict_seconds"], flux_row["p95_predict_seconds"]) == (3, 3)

    pending = rows[VERSION]
    assert (pending["jobs"], pending["unfinished"], pending["success_rate"]) == (1, 1, None)
    assert pending["p50_total_seconds"] is None


def test_orphan_predictions(conn, w):
    rows = conn.execute("SELECT * FROM orphan_predictions ORDER BY id").fetchall()
    assert [(r["id"], r["reason"], r["status"], r["event_count"]) for r in rows] == [
        ("p-orphan", "no job id", "processing", 1),
        ("p-unknown", "unknown job", "succeeded", 1),
    ]
    assert rows[0]["claimed_job_id"] is None and str(rows[1]["claimed_job_id"]) == w.jobs["unknown"]
    recorded = conn.execute("SELECT recorded_at FROM events WHERE event_key = 'msg_orphan'").fetchone()
    assert rows[0]["first_seen_at"] == rows[0]["last_seen_at"] == recorded["recorded_at"]
    assert rows[0]["model"] == SDXL


def test_every_view_is_commented_and_reads_with_the_callers_rights(conn):
    rows = conn.execute("""
        SELECT c.relname, obj_description(c.oid, 'pg_class') AS comment, c.reloptions
        FROM pg_class c
        WHERE c.relname IN ('job_history', 'job_timeline', 'model_daily_summary', 'orphan_predictions')
        ORDER BY 1""").fetchall()
    assert [r["relname"] for r in rows] == ["job_history", "job_timeline", "model_daily_summary",
                                            "orphan_predictions"]
    assert all(len(r["comment"]) > 80 for r in rows)
    assert all(r["reloptions"] == ["security_invoker=true"] for r in rows)
