"""Secure by default off loopback (service/exposure.py): no open jobs API, no open /metrics.

In process through the test client (HOST says where the app is served), and for real: gunicorn
with gunicorn.conf.py, `flask run` and scripts/dev.py bound to 0.0.0.0. Traffic goes only to
127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from service import create_app
from service.config import ROOT, Settings
from service.errors import ConfigError
from service.exposure import is_local, refusal
from service.storage import LocalStorage, object_path
from tests.signing import SECRET

KEY = "operator-key-0123456789"
TOKEN = "metrics-token-0123456789abcdef"
CLIENT = {"REMOTE_ADDR": "203.0.113.7"}  # as if from elsewhere (the test client never leaves the process)
SETTINGS = ("HOST", "PORT", "API_KEYS", "SUPABASE_JWT_SECRET", "SUPABASE_JWKS_URL", "ALLOW_OPEN_API",
            "METRICS_TOKEN", "ALLOW_OPEN_METRICS", "GUNICORN_CMD_ARGS")
JOB = {"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse"}}


@contextmanager
def served(db_url: str, **config: Any) -> Iterator[Any]:
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, **config})
    try:
        yield app.test_client()
    finally:
        app.extensions["db_pool"].close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("bind", ["127.0.0.1:8000", "127.1.2.3", "[::1]:8000", "::1", "localhost:8000",
                                  "LOCALHOST", "::ffff:127.0.0.1", "unix:/run/rjs.sock"])
def test_loopback_and_unix_sockets_are_local(bind):
    assert is_local(bind)


@pytest.mark.parametrize("bind", ["0.0.0.0:8000", "0.0.0.0", "[::]:8000", "::", "10.0.0.5:80",
                                  "192.168.1.2", "203.0.113.7:443", "example.com:80", "localhost.evil.com",
                                  ":8000", "fd://3"])
def test_every_other_address_is_public(bind):
    assert not is_local(bind)


def test_a_malformed_host_is_a_config_error(db_url):
    with pytest.raises(ConfigError, match=r"HOST: unbalanced \[ in '\[::1:8000'"):
        create_app({"TESTING": True, "DATABASE_URL": db_url, "HOST": "[::1:8000"})


def test_the_refusal_names_the_settings_and_only_a_public_bind_with_no_credential_is_refused():
    line = refusal({}, ("127.0.0.1:8000", "0.0.0.0:9125"))
    assert "0.0.0.0:9125" in line and "127.0.0.1" not in line and "\n" not in line
    for name in ("API_KEYS", "SUPABASE_JWT_SECRET", "SUPABASE_JWKS_URL", "ALLOW_OPEN_API=true"):
        assert name in line
    assert refusal({}, ("127.0.0.1:8000", "unix:/tmp/s")) is None
    assert refusal({"API_KEYS": (KEY,)}, ("0.0.0.0:1",)) is None
    assert refusal({"SUPABASE_JWT_SECRET": "s" * 32}, ("0.0.0.0:1",)) is None
    assert refusal({"SUPABASE_JWKS_URL": "https://x.supabase.co/auth/v1/.well-known/jwks.json"},
                   ("0.0.0.0:1",)) is None
    assert refusal({"ALLOW_OPEN_API": True}, ("0.0.0.0:1",)) is None


def test_the_new_settings_are_parsed_strictly():
    settings = Settings.from_env({"ALLOW_OPEN_API": "TRUE", "ALLOW_OPEN_METRICS": "0",
                                  "METRICS_TOKEN": f" {TOKEN} ", "HOST": "0.0.0.0"})
    assert (settings.ALLOW_OPEN_API, settings.ALLOW_OPEN_METRICS) == (True, False)
    assert (settings.METRICS_TOKEN, settings.HOST) == (TOKEN, "0.0.0.0")
    assert Settings.from_env({}).HOST == "127.0.0.1"
    with pytest.raises(ConfigError, match="ALLOW_OPEN_API must be true or false, got 'maybe'"):
        Settings.from_env({"ALLOW_OPEN_API": "maybe"})
    with pytest.raises(ConfigError, match="METRICS_TOKEN is too short"):
        Settings.from_env({"METRICS_TOKEN": "short"})
    assert TOKEN not in repr(settings)


def test_startup_on_a_public_address_with_no_credential_fails_with_the_message(db_url):
    with pytest.raises(ConfigError, match=r"refusing to start: .* 0\.0\.0\.0 .*API_KEYS.*ALLOW_OPEN_API=tr"):
        create_app({"TESTING": True, "DATABASE_URL": db_url, "HOST": "0.0.0.0"})


def test_allow_open_api_starts_open_and_warns(db_url, caplog):
    with caplog.at_level(logging.INFO, logger="service.exposure"):
        with served(db_url, HOST="0.0.0.0", ALLOW_OPEN_API=True) as client:
            assert client.post("/api/jobs", json=JOB, environ_base=CLIENT).status_code == 201
            assert client.get("/api/dashboard/health", environ_base=CLIENT).status_code == 200
    warnings = [r for r in caplog.records if r.name == "service.exposure" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "jobs API is open" in warnings[0].getMessage()
    assert "0.0.0.0" in warnings[0].getMessage()


def test_loopback_starts_as_today(db_url, caplog):
    with caplog.at_level(logging.INFO, logger="service.exposure"):
        with served(db_url) as client:
            assert client.post("/api/jobs", json=JOB).status_code == 201
            assert client.get("/metrics").status_code == 200
    assert not [r for r in caplog.records if r.name == "service.exposure"]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_metrics_token_is_required_wherever_it_is_set(db_url, host):
    with served(db_url, HOST=host, API_KEYS=(KEY,), METRICS_TOKEN=TOKEN) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
        assert refused.get_json()["error"] == "unauthorized"
        assert client.get("/metrics", headers=bearer(TOKEN[:-1])).status_code == 401
        assert client.get("/metrics", headers=bearer(KEY)).status_code == 401  # an API key is not it
        assert client.get("/metrics", headers={"Authorization": TOKEN}).status_code == 401
        right = client.get("/metrics", headers=bearer(TOKEN))
        assert right.status_code == 200 and b"rjs_database_up 1.0" in right.data


def test_metrics_are_off_on_a_public_address_unless_allowed(db_url):
    with served(db_url, HOST="0.0.0.0", API_KEYS=(KEY,)) as client:
        off = client.get("/metrics", headers=bearer(KEY))
        assert off.status_code == 404 and off.get_json()["error"] == "not_found"
    with served(db_url, HOST="0.0.0.0:8000", API_KEYS=(KEY,), ALLOW_OPEN_METRICS=True) as client:
        on = client.get("/metrics")
        assert on.status_code == 200 and b"rjs_webhooks_received_total" in on.data


def test_metrics_are_outside_the_rate_limit(db_url):
    with served(db_url, HOST="0.0.0.0", API_KEYS=(KEY,), METRICS_TOKEN=TOKEN,
                RATE_LIMIT_PER_MINUTE=1, RATE_LIMIT_BURST=1) as client:
        assert client.get("/api/jobs", headers=bearer(KEY), environ_base=CLIENT).status_code == 200
        assert client.get("/api/jobs", headers=bearer(KEY), environ_base=CLIENT).status_code == 429
        for _ in range(5):
            assert client.get("/metrics", headers=bearer(TOKEN), environ_base=CLIENT).status_code == 200


# What each surface answers a caller with no credential on a public address (docs/reliability.md).
SURFACES = {
    "/api/jobs": 401, "/api/dashboard/health": 401, "/api/dashboard/stream": 401,
    "/api/dashboard/models": 401, "/api/dashboard/search?q=abcd": 401,
    f"/api/dashboard/jobs/{uuid.uuid4()}/timeline": 401, f"/api/dashboard/jobs/{uuid.uuid4()}/outputs": 401,
    "/api/dashboard/events/1": 401, f"/api/jobs/{uuid.uuid4()}": 401, f"/api/jobs/{uuid.uuid4()}/events": 401,
    "/metrics": 404,
    # public by design: the API's description, the page, liveness
    "/api/openapi.json": 200, "/api/dashboard/config": 200, "/": 200, "/healthz": 200,
}


@pytest.mark.parametrize("credential", [{"API_KEYS": (KEY,)}, {"SUPABASE_JWT_SECRET": "s" * 40}])
def test_every_surface_on_a_public_address(db_url, tmp_path, credential):
    stored = LocalStorage(tmp_path).put(object_path(str(uuid.uuid4()), "p1", 0, "png"),
                                        b"\x89PNG\r\n\x1a\n", "image/png")
    with served(db_url, HOST="0.0.0.0", STORAGE_DIR=str(tmp_path), REPLICATE_WEBHOOK_SECRET=SECRET,
                **credential) as client:
        answers = {path: client.get(path, environ_base=CLIENT).status_code for path in SURFACES}
        webhook = client.post("/webhooks/replicate", json={"id": "p"}, environ_base=CLIENT)
        stored_file = client.get(f"/files/{stored.path}", environ_base=CLIENT)
    assert answers == SURFACES
    assert webhook.status_code == 401  # its signature is its credential
    assert stored_file.status_code == 200  # by its unguessable URL (a random job id), as in a public bucket


# ------------------------------------------------------------------ the real startup paths

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return probe.getsockname()[1]


def clean_env(db_url: str, tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and k != "PROMETHEUS_MULTIPROC_DIR"}
    metrics_dir = tmp_path / f"metrics-{len(list(tmp_path.iterdir()))}"
    metrics_dir.mkdir()
    return {**env, "DATABASE_URL": db_url, "WEB_CONCURRENCY": "1", "LOG_FORMAT": "text",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **settings}


def gunicorn(env: dict[str, str], *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *args, "wsgi:app"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@contextmanager
def running(proc: subprocess.Popen, port: int) -> Iterator[str]:
    """Wait until it answers on 127.0.0.1:port; stop it (by its pid) afterwards."""
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"exited {proc.returncode}: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "did not answer within 60 s"
            try:
                requests.get(f"{base}/healthz", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def refused(proc: subprocess.Popen) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=60)
    return proc.returncode, output


@pytest.mark.parametrize("settings, message", [
    ({}, "refusing to start: the jobs API and dashboard would be open to anyone who can reach 0.0.0.0:"),
    ({"ALLOW_OPEN_API": "sure"}, "ALLOW_OPEN_API must be true or false, got 'sure'")])
def test_gunicorn_on_a_public_host_refuses_to_start_with_one_line(db_url, tmp_path, settings, message):
    """The issue's command: HOST=0.0.0.0 gunicorn -c gunicorn.conf.py wsgi:app, no credential."""
    port = free_port()
    code, output = refused(gunicorn(clean_env(db_url, tmp_path, HOST="0.0.0.0", PORT=str(port), **settings)))
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0], output
    assert "Listening at" not in output and "Booting worker" not in output


def test_gunicorn_with_allow_open_api_starts_warns_and_keeps_metrics_off(db_url, tmp_path):
    """--bind overrides HOST: the check and the workers see gunicorn's final bind."""
    port = free_port()
    proc = gunicorn(clean_env(db_url, tmp_path, ALLOW_OPEN_API="true"), "--bind", f"0.0.0.0:{port}")
    with running(proc, port) as base:
        assert requests.get(f"{base}/api/jobs", timeout=5).status_code == 200
        assert requests.get(f"{base}/metrics", timeout=5).status_code == 404
    output = proc.stdout.read()
    assert "WARNING service.exposure: the jobs API is open (ALLOW_OPEN_API=true" in output, output
    assert f"anyone who can reach 0.0.0.0:{port}" in output


def test_gunicorn_on_a_public_host_with_keys_and_a_metrics_token(db_url, tmp_path):
    port = free_port()
    env = clean_env(db_url, tmp_path, HOST="0.0.0.0", PORT=str(port), API_KEYS=KEY, METRICS_TOKEN=TOKEN)
    with running(gunicorn(env), port) as base:
        assert requests.get(f"{base}/api/jobs", timeout=5).status_code == 401
        assert requests.get(f"{base}/api/jobs", headers=bearer(KEY), timeout=5).status_code == 200
        assert requests.get(f"{base}/metrics", timeout=5).status_code == 401
        wrong = requests.get(f"{base}/metrics", headers=bearer("wrong-token-0123456789"), timeout=5)
        assert wrong.status_code == 401
        scraped = requests.get(f"{base}/metrics", headers=bearer(TOKEN), timeout=5)
        assert scraped.status_code == 200 and "rjs_database_up 1.0" in scraped.text


def test_gunicorn_on_loopback_starts_as_today(db_url, tmp_path):
    port = free_port()
    with running(gunicorn(clean_env(db_url, tmp_path, PORT=str(port))), port) as base:
        assert requests.post(f"{base}/api/jobs", json=JOB, timeout=5).status_code == 201
        assert requests.get(f"{base}/metrics", timeout=5).status_code == 200


def test_flask_run_on_a_public_host_refuses(db_url, tmp_path):
    command = [str(Path(sys.executable).with_name("flask")), "--app", "service", "run", "--host", "0.0.0.0",
               "--port", str(free_port())]
    done = subprocess.run(command, cwd=ROOT, env=clean_env(db_url, tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("Error: refusing to start:") and "ALLOW_OPEN_API" in done.stderr


def test_the_dev_runner_on_a_public_host_refuses_before_starting_anything(db_url, tmp_path):
    command = [sys.executable, "scripts/dev.py", "--host", "0.0.0.0", "--port", str(free_port())]
    done = subprocess.run(command, cwd=ROOT, env=clean_env(db_url, tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: refusing to start:") and "API_KEYS" in done.stderr
    assert "migrations" not in done.stderr + done.stdout
