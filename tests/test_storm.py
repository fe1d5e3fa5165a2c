"""The webhook storm (scripts/faults/storm.py), small: signed deliveries with 30% redeliveries in
random order, concurrently through gunicorn: one event per unique webhook id, and projections
equal to a replay and to the same webhooks recorded once each in lifecycle order."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack

from scripts.faults.compare import differences, projection
from scripts.faults.storm import make_storm, record_in_order, report, run_storm, scratch_database


def test_the_plan_has_the_asked_shape():
    storm = make_storm(jobs=50, total=700, duplicates=0.3, seed=3)
    ids = [w.webhook_id for w in storm.deliveries]
    assert len(ids) == 700 and len(set(ids)) == 490 == len(storm.in_order)
    assert storm.plan.jobs == 50
    assert {w.query.split("&")[0] for w in storm.in_order} == {
        f"?job={key.removeprefix('created:')}" for key, *_ in storm.plan.setup if key.startswith("created:")}
    assert ids[: len(storm.in_order)] != [w.webhook_id for w in storm.in_order]  # shuffled


def test_a_storm_records_each_webhook_once_and_folds_as_in_order(server_url, tmp_path):
    with ExitStack() as dbs:
        url, reference, short = (dbs.enter_context(scratch_database(server_url, f"{name}_{os.getpid()}"))
                                 for name in ("storm", "storm_in_order", "storm_short"))
        storm = make_storm(jobs=150, total=1500, duplicates=0.3, seed=5)
        outcome = run_storm(storm, url, reference, connections=12, tmp=tmp_path)
        summary = report(storm, outcome, 12)
        assert outcome.answers == {"200 recorded": 1050, "200 duplicate": 450}, summary
        assert outcome.events == outcome.unique_ids == 1050 and outcome.missing == 0, summary
        assert outcome.replay_differences == 0, summary
        assert outcome.in_order_differences == [], summary
        assert outcome.ok, summary

        # the comparison would see a lost webhook: in order again, without one terminal webhook
        last = next(w for w in reversed(storm.in_order) if json.loads(w.body)["status"] == "succeeded")
        storm.in_order.remove(last)
        record_in_order(short, storm)
        found = differences(projection(url), projection(short))
        assert any(json.loads(last.body)["id"] in line for line in found), found
