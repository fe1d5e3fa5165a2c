"""What a job cost: compute seconds from real Replicate payloads (one with a negative
predict_time, which is left out and counted), and dollars from REPLICATE_PRICES only."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest

from service import create_app
from service.costs import Price, job_cost, parse_prices
from service.errors import ConfigError
from tests.conftest import new_job_id, payload
from tests.test_auth import ALICE
from tests.workload import create_job, webhook

SDXL_VERSION = payload("succeeded_sdxl_output_list_with_logs")["version"]
PAYLOADS = ("succeeded_sdxl_output_list_with_logs",  # stability-ai/sdxl, 3.804328 s
            "succeeded_sdxl_polled_list_output",  # stability-ai/sdxl, 11.859389 s
            "succeeded_default_example_list_of_file_objects_negative_predict_time",  # huiyegit/t2i_cl
            "failed_flux11pro_nsfw_with_traceback_logs")  # no model in the body, 5.984336918 s
PRICES = '{"stability-ai/sdxl": {"per_second": 0.001}, "huiyegit/t2i_cl": {"per_prediction": 0.01}}'


def record_job(conn) -> str:
    job = new_job_id()
    create_job(conn, job, count=len(PAYLOADS), owner_id=ALICE)
    for name in PAYLOADS:
        webhook(conn, job, payload(name), key=f"msg-{name}")
    conn.commit()
    return job


@pytest.fixture
def priced(db_url: str) -> Iterator:
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "REPLICATE_PRICES": PRICES})
    yield app.test_client()
    app.extensions["db_pool"].close()


def test_the_job_api_shows_compute_seconds_and_the_estimated_cost(priced, conn):
    job = record_job(conn)
    body = priced.get(f"/api/jobs/{job}").get_json()
    assert body["cost"] == {
        "compute_seconds": 21.648054,  # 3.804328 + 11.859389 + 5.984336918; the negative one left out
        "predict_time_anomalies": 1,
        "estimated_dollars": 0.025664,  # 0.001 × 15.663717 s of sdxl + 0.01 × 1 t2i_cl prediction
        "unpriced_predictions": 1}  # the failed one: its body names no model
    listed = priced.get("/api/jobs").get_json()["jobs"]
    assert [j["cost"] for j in listed] == [body["cost"]]


def test_job_history_and_the_compute_views_sum_the_same_seconds(conn):
    job = record_job(conn)
    row = conn.execute("SELECT predict_time_seconds, predict_time_anomalies, owner_id::text AS owner_id "
                       "FROM job_history WHERE id = %s", (job,)).fetchone()
    assert row == {"predict_time_seconds": Decimal("21.648053918"), "predict_time_anomalies": 1,
                   "owner_id": ALICE}
    owner = conn.execute("SELECT jobs, predictions, succeeded, compute_seconds, predict_time_anomalies "
                         "FROM owner_compute WHERE owner_id = %s", (ALICE,)).fetchone()
    assert owner == {"jobs": 1, "predictions": 4, "succeeded": 3,
                     "compute_seconds": Decimal("21.648053918"), "predict_time_anomalies": 1}
    models = {r["model"]: r for r in conn.execute(
        "SELECT model, predictions, succeeded, compute_seconds, predict_time_anomalies FROM model_compute")}
    assert models["stability-ai/sdxl"] == {"model": "stability-ai/sdxl", "predictions": 2, "succeeded": 2,
                                           "compute_seconds": Decimal("15.663717"),
                                           "predict_time_anomalies": 0}
    assert models["huiyegit/t2i_cl"]["compute_seconds"] is None
    assert models["huiyegit/t2i_cl"]["predict_time_anomalies"] == 1


def test_a_version_price_wins_over_its_models_and_no_price_means_no_dollars():
    groups = [{"model": "stability-ai/sdxl", "version": SDXL_VERSION, "succeeded": 2, "seconds": 15.0,
               "timed": 2, "untimed": 0, "billable": 2, "anomalies": 0}]
    prices = {"stability-ai/sdxl": Price("per_second", 1.0),
              f"stability-ai/sdxl:{SDXL_VERSION}": Price("per_prediction", 0.5)}
    assert job_cost(groups, prices)["estimated_dollars"] == 1.0
    assert job_cost(groups, {})["estimated_dollars"] is None  # never guessed
    assert job_cost(groups, {})["unpriced_predictions"] == 2


@pytest.mark.parametrize("text, message", [
    ("not json", "REPLICATE_PRICES must be JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"sdxl": {"per_second": 1}}', "'sdxl' is not a model"),
    ('{"a/b": 0.001}', 'must be {"per_second": dollars}'),
    ('{"a/b": {"per_hour": 1}}', 'must be {"per_second": dollars}'),
    ('{"a/b": {"per_second": 1, "per_prediction": 2}}', 'must be {"per_second": dollars}'),
    ('{"a/b": {"per_second": -1}}', "must be a number of dollars ≥ 0, got -1"),
    ('{"a/b": {"per_second": "0.1"}}', "must be a number of dollars"),
])
def test_bad_prices_stop_startup_with_a_clear_message(db_url, text, message):
    with pytest.raises(ConfigError, match="REPLICATE_PRICES") as raised:
        parse_prices(text)
    assert message in str(raised.value)
    with pytest.raises(ConfigError, match="REPLICATE_PRICES"):
        create_app({"TESTING": True, "DATABASE_URL": db_url, "REPLICATE_PRICES": text})


def test_prices_of_a_model_and_of_a_version_are_read():
    text = f'{{"a/b": {{"per_second": 0.000725}}, "a/b:{SDXL_VERSION}": {{"per_prediction": 3}}}}'
    assert parse_prices(text) == {
        "a/b": Price("per_second", 0.000725), f"a/b:{SDXL_VERSION}": Price("per_prediction", 3.0)}
    assert parse_prices(None) == {} and parse_prices("  ") == {}
