from __future__ import annotations

import pytest

from service.config import Settings
from service.errors import ConfigError
from tests.conftest import new_job_id
from tests.workload import create_job


def test_healthz_reports_the_database(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["database"] == "ok"
    assert response.get_json()["migrations"] >= 3


def test_healthz_is_503_when_the_database_is_unreachable(app):
    app.extensions["db_pool"].close()
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "database": "unreachable"}


def test_the_dashboard_lists_jobs_from_the_projection(client, conn):
    # the page is static (service/static); its script reads the jobs API and /api/dashboard
    assert '<main id="main"' in client.get("/").get_data(as_text=True)
    job = new_job_id()
    create_job(conn, job, count=3)
    [listed] = client.get("/api/jobs").get_json()["jobs"]
    assert (listed["id"], listed["status"], listed["progress"]["total"]) == (job, "pending", 3)
    assert client.get("/api/dashboard/health").get_json()["status_counts"]["pending"] == 1


@pytest.mark.parametrize("env,message", [
    ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL must start with postgresql://"),
    ({"DB_POOL_MAX": "lots"}, "DB_POOL_MAX must be a whole number"),
    ({"DB_POOL_MAX": "0"}, "DB_POOL_MAX must be between 1 and 200"),
    ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL must be"),
])
def test_bad_settings_stop_startup_with_a_message_naming_them(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_env_example_names_every_setting():
    from dataclasses import fields
    from pathlib import Path

    listed = {line.split("=", 1)[0] for line in
              (Path(__file__).resolve().parent.parent / ".env.example").read_text().splitlines()
              if line and not line.startswith("#")}
    assert {f.name for f in fields(Settings)} <= listed
