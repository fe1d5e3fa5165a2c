"""Delivery order and duplicates must not change the projection (Hypothesis)."""

from __future__ import annotations

import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import events
from tests.conftest import new_job_id
from tests.workload import CANCELED, FAILED, LIFECYCLE, bodies, create_job, prediction_row, webhook

SEQUENCES = {"succeeded": LIFECYCLE, "failed": FAILED, "canceled": CANCELED}
_ids = itertools.count()


def _states(kind: str, pid: str, polled_after: bool) -> list[tuple[str, str, dict]]:
    """(event type, key, body) for one prediction's life, optionally a late poll."""
    states = bodies(SEQUENCES[kind], pid)
    out = [("replicate.webhook", f"msg_{pid}_{i}", s) for i, s in enumerate(states)]
    if polled_after:
        final = dict(states[-1], logs="", output=None, data_removed=True)
        out.append(("replicate.polled", f"polled:{pid}:removed", final))
    return out


def _deliver(conn, job: str, items: list[tuple[str, str, dict]]) -> None:
    for type_, key, body in items:
        if type_ == "replicate.webhook":
            webhook(conn, job, body, key=key)
        else:
            events.append(conn, key=key, stream=job, type=type_, data=body, metadata={})


def _projected(conn, job: str, pid: str, items: list[tuple[str, str, dict]]) -> tuple[dict, dict]:
    """Deliver items in a transaction, read the projection, roll back: each delivery
    order is tried on the same ids from the same starting point."""
    with conn.transaction(force_rollback=True):
        create_job(conn, job)
        _deliver(conn, job, items)
        job_row = conn.execute(
            "SELECT status, predictions_succeeded, predictions_failed, outputs_expected, error, "
            "started_at, completed_at FROM jobs WHERE id = %s", (job,)).fetchone()
        return prediction_row(conn, pid), job_row


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(SEQUENCES)), polled_after=st.booleans(),
       seed=st.integers(0, 2**32 - 1), extra=st.lists(st.integers(0, 10), max_size=8))
def test_shuffled_and_duplicated_delivery_gives_the_in_order_projection(
        conn, kind, polled_after, seed, extra):
    job, pid = new_job_id(), f"p{next(_ids)}"
    in_order = _states(kind, pid, polled_after)
    shuffled = in_order + [in_order[i % len(in_order)] for i in extra]  # same webhook-id again
    random.Random(seed).shuffle(shuffled)
    expected = _projected(conn, job, pid, in_order)
    assert expected[0]["status"] == in_order[-1 - polled_after][2]["status"]
    assert _projected(conn, job, pid, shuffled) == expected


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(SEQUENCES)), first=st.floats(0, 100), second=st.floats(0, 100))
def test_two_distinct_bodies_with_the_same_status_and_sizes_resolve_the_same_either_way(
        conn, kind, first, second):
    """The content-hash part of the fold key breaks ties that status and sizes cannot."""
    job, pid = new_job_id(), f"p{next(_ids)}"
    final = bodies(SEQUENCES[kind][-1:], pid)[0]
    one = ("replicate.webhook", "msg_one", dict(final, metrics={"predict_time": first}))
    two = ("replicate.webhook", "msg_two", dict(final, metrics={"predict_time": second}))
    assert _projected(conn, job, pid, [one, two]) == _projected(conn, job, pid, [two, one])


# Deadlines and retries: a job with a deadline whose predictions failed, were canceled and
# were aborted, a retry round (job.retried) that supersedes them, and the round's new
# predictions. Replicate's aborted body is a canceled one that never started.
def _aborted(pid: str) -> list[dict]:
    starting, canceled = bodies(CANCELED, pid)
    return [starting, dict(canceled, status="aborted", started_at=None, metrics={}, logs=None)]


def _retry_workload(job: str, outcome: str) -> list[tuple[str, str, dict]]:
    tag = job[-12:]  # the random end of the id: jobs made in the same minute share its start
    lives = {"a": bodies(FAILED, "a" + tag), "b": bodies(CANCELED, "b" + tag), "c": _aborted("c" + tag)}
    retried = {"ra": bodies(LIFECYCLE if outcome == "succeeded" else FAILED, "ra" + tag),
               "rb": bodies(LIFECYCLE, "rb" + tag) if outcome == "succeeded" else _aborted("rb" + tag),
               "rc": _aborted("rc" + tag)}
    items = [("replicate.webhook", f"msg_{name}_{i}", body)
             for name, states in (lives | retried).items() for i, body in enumerate(states)]
    items.append(("job.retried", f"retried:{job}:1",
                  {"retry": 1, "predictions": [states[0]["id"] for states in lives.values()]}))
    return items


def _job_and_predictions(conn, job: str) -> tuple[dict, list[dict]]:
    row = conn.execute("SELECT status, predictions_succeeded, predictions_failed, error, "
                       "deadline - created_at AS span FROM jobs WHERE id = %s", (job,)).fetchone()
    predictions = conn.execute("SELECT id, status, superseded FROM predictions WHERE job_id = %s ORDER BY id",
                               (job,)).fetchall()
    return row, predictions


def _retried_projection(conn, job: str, items: list[tuple[str, str, dict]], rebuild: bool) -> tuple:
    with conn.transaction(force_rollback=True):
        create_job(conn, job, count=3, cancel_after=60)
        _deliver(conn, job, items)
        live = _job_and_predictions(conn, job)
        if not rebuild:
            return live
        conn.execute("SELECT clear_projections(%(s)s), rebuild_scan(%(s)s), rebuild_predictions(%(s)s), "
                     "rebuild_outputs(%(s)s), rebuild_jobs(%(s)s)", {"s": [job]})
        assert _job_and_predictions(conn, job) == live  # the set-based replay agrees
        return live


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(outcome=st.sampled_from(["succeeded", "failed"]), seed=st.integers(0, 2**32 - 1))
def test_a_retry_round_folds_the_same_in_any_order_and_in_a_rebuild(conn, outcome, seed):
    job = new_job_id()
    in_order = _retry_workload(job, outcome)
    shuffled = list(in_order)
    random.Random(seed).shuffle(shuffled)
    expected = _retried_projection(conn, job, in_order, rebuild=True)
    row, predictions = expected
    assert [p["superseded"] for p in predictions] == [True, True, True, False, False, False]
    # only the round's predictions count (2 succeeded: their outputs wait to be processed);
    # with none succeeded, the deadline is the reason
    assert (row["status"], row["error"], row["predictions_succeeded"], row["predictions_failed"]) == (
        ("processing", None, 2, 1) if outcome == "succeeded" else ("failed", "deadline exceeded", 0, 3))
    # the deadline moves with the retry's recorded_at, which differs between the two runs
    assert _without_span(_retried_projection(conn, job, shuffled, rebuild=True)) == _without_span(expected)
    assert row["span"].total_seconds() >= 60


def _without_span(projection: tuple) -> tuple:
    row, predictions = projection
    return {k: v for k, v in row.items() if k != "span"}, predictions
