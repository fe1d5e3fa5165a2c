"""The per-address token bucket on /webhooks and /api: 429 with Retry-After and a JSON
message, other addresses unaffected, loopback exempt by default, 0 = off."""

from __future__ import annotations

import pytest

from service import create_app
from service.ratelimit import TokenBuckets
from tests.conftest import payload
from tests.signing import SECRET, signed

CLIENT = "203.0.113.7"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_refills_at_its_rate():
    clock = Clock()
    buckets = TokenBuckets(per_minute=60, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(1.0)  # one a second
    assert buckets.take("b") == 0.0  # another address has its own bucket
    clock.now += 0.5
    assert buckets.take("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert buckets.take("a") == 0.0
    clock.now += 3600  # a full bucket holds no more than the burst
    assert [buckets.take("a") for _ in range(4)][-1] > 0


def test_idle_addresses_are_forgotten_when_there_are_too_many(monkeypatch):
    monkeypatch.setattr("service.ratelimit.MAX_ADDRESSES", 10)
    clock = Clock()
    buckets = TokenBuckets(per_minute=60, burst=1, clock=clock)
    for n in range(10):
        buckets.take(f"idle{n}")
    clock.now += 5  # every bucket is full again: nothing to remember
    buckets.take("new")
    assert set(buckets._buckets) == {"new"}


def limited_app(db_url, **config):
    settings = {"TESTING": True, "DATABASE_URL": db_url, "REPLICATE_WEBHOOK_SECRET": SECRET,
                "RATE_LIMIT_PER_MINUTE": 6, "RATE_LIMIT_BURST": 2, "RATE_LIMIT_EXEMPT": ("127.0.0.1",)}
    return create_app(settings | config)


@pytest.fixture
def app(db_url):
    app = limited_app(db_url)
    yield app
    app.extensions["db_pool"].close()


def events(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"]


def test_over_the_limit_the_api_answers_429_with_retry_after(client):
    answers = [client.get("/api/jobs", environ_base={"REMOTE_ADDR": CLIENT}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    refused = answers[-1]
    assert refused.headers["Retry-After"] == "10"  # six a minute: the next token in 10 s
    assert refused.get_json() == {"error": "rate_limited", "retry_after": 10,
                                  "message": "too many requests from this address; retry after 10 s"}
    assert client.get("/api/jobs", environ_base={"REMOTE_ADDR": "203.0.113.8"}).status_code == 200
    assert all(client.get("/api/jobs").status_code == 200 for _ in range(5))  # loopback is exempt


def test_a_webhook_over_the_limit_is_429_and_not_stored(client, conn):
    codes = []
    for _ in range(3):
        raw, headers = signed(payload("processing_sdxl_partial_logs"))
        codes.append(client.post("/webhooks/replicate", data=raw, headers=headers,
                                 environ_base={"REMOTE_ADDR": CLIENT}).status_code)
    assert codes == [200, 200, 429]
    assert events(conn) == 2


def test_the_limit_comes_before_authentication(db_url):
    app = limited_app(db_url, API_KEYS=("right-key",))
    client = app.test_client()
    guesses = [client.get("/api/jobs", headers={"Authorization": f"Bearer guess{n}"},
                          environ_base={"REMOTE_ADDR": CLIENT}).status_code for n in range(4)]
    assert guesses == [401, 401, 429, 429]
    app.extensions["db_pool"].close()


def test_zero_turns_the_limit_off(db_url):
    app = limited_app(db_url, RATE_LIMIT_PER_MINUTE=0)
    client = app.test_client()
    assert all(client.get("/api/jobs", environ_base={"REMOTE_ADDR": CLIENT}).status_code == 200
               for _ in range(10))
    app.extensions["db_pool"].close()


def test_pages_and_health_are_not_limited(client):
    for _ in range(5):
        assert client.get("/healthz", environ_base={"REMOTE_ADDR": CLIENT}).status_code == 200
