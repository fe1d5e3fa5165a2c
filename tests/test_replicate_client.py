"""The Replicate client over real HTTP, against a local server that answers the way Replicate's
documented API does. Tests script its answers and read back the requests it received."""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from service.config import Settings
from service.errors import (
    ConfigError,
    InvalidPredictionRequest,
    ReplicateError,
    ReplicateRateLimited,
    ReplicateRejected,
    ReplicateUnavailable,
)
from service.logs import ContextFormatter
from service.replicate import ReplicateClient, from_settings
from tests.conftest import payload

TOKEN = "r8_TestTokenThatMustNeverBeLogged1234567"
VERSION = "39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WEBHOOK = "https://jobs.example.com/webhooks/replicate?job=j1&step=0"


@dataclass
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


def problem(status: int, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"title": title, "detail": detail, "status": status, **extra}


class FakeReplicate:
    """Scripted replies first, then Replicate's documented answers; every request is recorded."""

    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.received: list[Received] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def then(self, *replies: Reply) -> FakeReplicate:
        self.script.extend(replies)
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, method: str, path: str, headers: dict[str, str], body: Any) -> Reply:
        self.received.append(Received(method, path, headers, body, time.monotonic()))
        if self.script:
            return self.script.popleft()
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return Reply(401, problem(401, "Unauthenticated", "You did not pass a valid token"))
        return self.documented(method, path, body)

    def documented(self, method: str, path: str, body: Any) -> Reply:
        parts = path.strip("/").split("/")
        if method == "POST" and (parts == ["v1", "predictions"] or parts[-1] == "predictions"):
            return Reply(201, {**payload("starting_sdxl_create_response"), "input": body["input"]})
        if method == "GET" and parts[:2] == ["v1", "predictions"] and len(parts) == 3:
            return Reply(200, {**payload("succeeded_sdxl_polled_list_output"), "id": parts[2]})
        if method == "POST" and parts[:2] == ["v1", "predictions"] and parts[3:] == ["cancel"]:
            return Reply(200, {**payload("canceled_sdxl_immediately"), "id": parts[2]})
        if method == "GET" and path == "/v1/webhooks/default/secret":
            return Reply(200, {"key": SECRET})
        return Reply(404, problem(404, "Not found", "Not found."))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _serve(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                reply = fake.answer(self.command, self.path, dict(self.headers),
                                    json.loads(raw) if raw else None)
                time.sleep(reply.delay)
                data = b"" if reply.body is None else json.dumps(reply.body).encode()
                kind = "application/problem+json" if reply.status >= 400 else "application/json"
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left, which is what the test wanted

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(ContextFormatter("%(levelname)s %(name)s: %(message)s"))
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def replicate() -> Iterator[FakeReplicate]:
    fake = FakeReplicate()
    yield fake
    fake.close()


@pytest.fixture
def logs() -> Iterator[Captured]:
    """The client's log lines, caught on its own logger (the app may stop propagation)."""
    log, handler = logging.getLogger("service.replicate"), Captured()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)


def client_for(url: str, **options: Any) -> ReplicateClient:
    settings = {"rate_per_minute": 6000, "timeout": (1.0, 2.0), "max_retries": 3,
                "backoff_base": 0.05, "backoff_cap": 0.5, **options}
    return ReplicateClient(url, TOKEN, **settings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("target", "path"), [
    ({"version": VERSION}, "/v1/predictions"),
    ({"model": "black-forest-labs/flux-schnell"}, "/v1/models/black-forest-labs/flux-schnell/predictions"),
    ({"deployment": "acme/sdxl-prod"}, "/v1/deployments/acme/sdxl-prod/predictions"),
])
def test_create_sends_the_documented_request(replicate: FakeReplicate, target: dict, path: str) -> None:
    prediction = client_for(replicate.url).create_prediction(**target, input={"prompt": "a corgi"},
                                                             webhook=WEBHOOK)
    [sent] = replicate.received
    assert (sent.method, sent.path) == ("POST", path)
    assert sent.headers["Authorization"] == f"Bearer {TOKEN}"
    assert sent.headers["Content-Type"] == "application/json"
    in_body = {"version": VERSION} if "version" in target else {}  # models/deployments name it in the path
    assert sent.body == {**in_body, "input": {"prompt": "a corgi"}, "webhook": WEBHOOK,
                         "webhook_events_filter": ["start", "output", "logs", "completed"]}
    assert prediction["id"] == "vgcm4plb7tgzlyznry5d5jkgvu" and prediction["status"] == "starting"


def test_create_without_webhook_sends_no_webhook_fields(replicate: FakeReplicate) -> None:
    client_for(replicate.url).create_prediction(version=VERSION, input={"prompt": "x"},
                                                webhook_events_filter=["completed"])
    assert replicate.received[0].body == {"version": VERSION, "input": {"prompt": "x"}}


def test_create_passes_a_chosen_events_filter(replicate: FakeReplicate) -> None:
    client_for(replicate.url).create_prediction(model="acme/m", input={}, webhook=WEBHOOK,
                                                webhook_events_filter=("completed", "start"))
    assert replicate.received[0].body["webhook_events_filter"] == ["completed", "start"]


@pytest.mark.parametrize("arguments", [
    {"input": {}},
    {"version": VERSION, "model": "acme/m", "input": {}},
    {"model": "acme", "input": {}},
    {"deployment": "acme/sdxl/../../predictions", "input": {}},
    {"version": "", "input": {}},
    {"version": VERSION, "input": ["not", "a", "mapping"]},
    {"version": VERSION, "input": {}, "webhook": "ftp://example.com/hook"},
    {"version": VERSION, "input": {}, "webhook": WEBHOOK, "webhook_events_filter": "completed"},
    {"version": VERSION, "input": {}, "webhook": WEBHOOK, "webhook_events_filter": ["finished"]},
    {"version": VERSION, "input": {}, "webhook": WEBHOOK, "webhook_events_filter": []},
])
def test_bad_arguments_are_refused_before_sending(replicate: FakeReplicate, arguments: dict) -> None:
    with pytest.raises(InvalidPredictionRequest) as caught:
        client_for(replicate.url).create_prediction(**arguments)
    assert caught.value.transient is False
    assert replicate.received == []


def test_get_cancel_and_default_secret(replicate: FakeReplicate, logs: Captured) -> None:
    client = client_for(replicate.url)
    got = client.get_prediction("vgcm4plb7tgzlyznry5d5jkgvu")
    canceled = client.cancel_prediction("vgcm4plb7tgzlyznry5d5jkgvu")
    assert client.default_webhook_secret() == SECRET
    assert [(r.method, r.path) for r in replicate.received] == [
        ("GET", "/v1/predictions/vgcm4plb7tgzlyznry5d5jkgvu"),
        ("POST", "/v1/predictions/vgcm4plb7tgzlyznry5d5jkgvu/cancel"),
        ("GET", "/v1/webhooks/default/secret"),
    ]
    assert (got["status"], canceled["status"]) == ("succeeded", "canceled")
    first = logs.records[0]
    assert (first.method, first.path, first.status, first.attempt) == (
        "GET", "/predictions/vgcm4plb7tgzlyznry5d5jkgvu", 200, 1)
    assert first.prediction_id == "vgcm4plb7tgzlyznry5d5jkgvu" and first.elapsed_ms >= 0
    assert all(r.action == "replicate_request" for r in logs.records)
    with pytest.raises(InvalidPredictionRequest):
        client.get_prediction("../webhooks/default/secret")


def test_429_waits_for_retry_after_in_the_body(replicate: FakeReplicate) -> None:
    replicate.then(Reply(429, {"detail": "Request was throttled. Your rate limit resets in ~1s.",
                               "status": 429, "retry_after": 1}))
    prediction = client_for(replicate.url).create_prediction(version=VERSION, input={})
    first, second = replicate.received
    assert 1.0 <= second.at - first.at < 5.0
    assert prediction["status"] == "starting"


@pytest.mark.parametrize("headers", [{"Retry-After": "1"}, {"X-RateLimit-Reset": "1"}])
def test_429_waits_for_the_headers(replicate: FakeReplicate, headers: dict[str, str]) -> None:
    replicate.then(Reply(429, {"detail": "Request was throttled."}, headers))
    client_for(replicate.url).get_prediction("abc")
    first, second = replicate.received
    assert 1.0 <= second.at - first.at < 5.0


def test_429_after_all_retries_raises_rate_limited(replicate: FakeReplicate) -> None:
    throttled = Reply(429, {"detail": "Request was throttled.", "status": 429, "retry_after": 0.1})
    replicate.then(*[throttled] * 3)
    with pytest.raises(ReplicateRateLimited) as caught:
        client_for(replicate.url, max_retries=2).create_prediction(version=VERSION, input={})
    assert len(replicate.received) == 3
    assert caught.value.transient is True and caught.value.retry_after == 0.1
    assert "Request was throttled." in str(caught.value)


def test_a_429_too_long_to_sleep_through_is_handed_to_the_caller(replicate: FakeReplicate) -> None:
    replicate.then(Reply(429, {"detail": "Your rate limit resets in ~3600s."}))
    started = time.monotonic()
    with pytest.raises(ReplicateRateLimited) as caught:
        client_for(replicate.url).create_prediction(version=VERSION, input={})
    assert time.monotonic() - started < 1.0
    assert caught.value.retry_after == 3600.0 and len(replicate.received) == 1


def test_server_errors_are_retried_with_backoff(replicate: FakeReplicate, logs: Captured) -> None:
    replicate.then(Reply(500, problem(500, "Internal Server Error", "boom")),
                   Reply(502, None))
    client = client_for(replicate.url, backoff_base=0.2, backoff_cap=2.0)
    shared = random.getstate()
    prediction = client.get_prediction("vgcm4plb7tgzlyznry5d5jkgvu")
    assert random.getstate() == shared  # the jitter has a generator of its own
    first, second, third = replicate.received
    assert second.at - first.at >= 0.1 and third.at - second.at >= 0.2  # at least half of 0.2, 0.4
    assert first.path == second.path == third.path
    assert prediction["id"] == "vgcm4plb7tgzlyznry5d5jkgvu"
    assert [(r.status, r.attempt) for r in logs.records] == [(500, 1), (502, 2), (200, 3)]


def test_a_creation_replicate_may_have_received_is_not_repeated(replicate: FakeReplicate) -> None:
    """A 5xx answer to a creation may come after the prediction started: sending it again
    could start a second, paid prediction. The queue's retry looks for the first instead."""
    replicate.then(Reply(500, problem(500, "Internal Server Error", "boom")))
    with pytest.raises(ReplicateUnavailable) as caught:
        client_for(replicate.url, backoff_base=0.2).create_prediction(version=VERSION, input={})
    assert len(replicate.received) == 1
    assert caught.value.transient is True and caught.value.reached is True


def test_a_creation_that_never_connected_is_retried(logs: Captured) -> None:
    client = client_for(f"http://127.0.0.1:{free_port()}/v1", max_retries=2, backoff_base=0.05)
    with pytest.raises(ReplicateUnavailable) as caught:
        client.create_prediction(version=VERSION, input={})
    assert caught.value.reached is False
    assert [r.attempt for r in logs.records] == [1, 2, 3]


def test_server_errors_after_all_retries_raise_unavailable(replicate: FakeReplicate) -> None:
    replicate.then(*[Reply(503, problem(503, "Service Unavailable", "try later"))] * 3)
    with pytest.raises(ReplicateUnavailable) as caught:
        client_for(replicate.url, max_retries=2).get_prediction("abc")
    assert len(replicate.received) == 3
    assert caught.value.transient is True and caught.value.replicate_status == 503
    assert caught.value.detail == "try later"


@pytest.mark.parametrize(("status", "detail"), [
    (422, "- input.width: Must be less than or equal to 1024"),
    (404, "The requested resource could not be found."),
    (401, "You did not pass a valid authentication token"),
])
def test_client_errors_are_final(replicate: FakeReplicate, status: int, detail: str) -> None:
    replicate.then(Reply(status, problem(status, "Request failed", detail)))
    with pytest.raises(ReplicateRejected) as caught:
        client_for(replicate.url).create_prediction(model="acme/unknown", input={"width": 4096})
    assert len(replicate.received) == 1
    assert caught.value.transient is False and caught.value.replicate_status == status
    assert caught.value.detail == detail and detail in str(caught.value)


def test_connection_refused_is_retried_then_unavailable(logs: Captured) -> None:
    client = client_for(f"http://127.0.0.1:{free_port()}/v1", max_retries=2)
    with pytest.raises(ReplicateUnavailable) as caught:
        client.get_prediction("abc")
    assert caught.value.transient is True
    assert [r.attempt for r in logs.records] == [1, 2, 3]
    assert all(r.status == "ConnectionError" for r in logs.records)


def test_timeouts_are_retried_then_unavailable(replicate: FakeReplicate) -> None:
    replicate.then(*[Reply(200, {"id": "late"}, delay=1.0)] * 3)
    client = client_for(replicate.url, timeout=(1.0, 0.2), max_retries=2)
    started = time.monotonic()
    with pytest.raises(ReplicateUnavailable) as caught:
        client.get_prediction("late")
    assert 0.6 <= time.monotonic() - started < 5.0
    assert len(replicate.received) == 3 and "ReadTimeout" in str(caught.value)


def test_a_creation_that_timed_out_is_not_repeated(replicate: FakeReplicate) -> None:
    replicate.then(Reply(201, {"id": "late"}, delay=1.0))
    with pytest.raises(ReplicateUnavailable) as caught:
        client_for(replicate.url, timeout=(1.0, 0.2)).create_prediction(version=VERSION, input={})
    assert len(replicate.received) == 1 and caught.value.reached is True


def test_creations_are_paced(replicate: FakeReplicate) -> None:
    client = client_for(replicate.url, rate_per_minute=120)
    started = time.monotonic()
    for n in range(4):
        client.create_prediction(version=VERSION, input={"n": n})
    assert 1.4 <= time.monotonic() - started < 10.0


def test_pacing_is_shared_by_threads(replicate: FakeReplicate) -> None:
    client = client_for(replicate.url, rate_per_minute=120)
    threads = [threading.Thread(target=client.create_prediction, kwargs={"version": VERSION, "input": {}})
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    arrivals = sorted(r.at for r in replicate.received)
    assert len(arrivals) == 4
    assert arrivals[-1] - arrivals[0] >= 1.3  # slots 0.5 s apart, whichever thread got which
    assert all(later - earlier >= 0.25 for earlier, later in zip(arrivals, arrivals[1:], strict=False))


def test_low_credit_rate_spaces_creations_ten_seconds_apart() -> None:
    assert ReplicateClient("https://api.replicate.com/v1", TOKEN, rate_per_minute=6).limiter.interval == 10.0


def test_token_never_reaches_logs_or_errors(replicate: FakeReplicate, logs: Captured) -> None:
    client = client_for(replicate.url, max_retries=1)
    replicate.then(Reply(429, {"detail": "throttled", "retry_after": 0}),
                   Reply(422, problem(422, "Invalid", f"echoed Bearer {TOKEN}")))
    errors: list[ReplicateError] = []
    for call in (lambda: client.create_prediction(version=VERSION, input={}),
                 lambda: client.get_prediction("abc"),
                 lambda: client_for(f"http://127.0.0.1:{free_port()}/v1", max_retries=0).get_prediction("x")):
        try:
            call()
        except ReplicateError as exc:
            errors.append(exc)
    assert len(errors) == 2 and len(logs.lines) == 4
    seen = "\n".join(logs.lines + [str(e) for e in errors] + [repr(e) for e in errors] + [repr(client)])
    assert TOKEN not in seen
    assert all(TOKEN not in str(value) for r in logs.records for value in vars(r).values())


def test_from_settings_builds_a_working_client(replicate: FakeReplicate) -> None:
    config = Settings.from_env({"REPLICATE_API_BASE_URL": replicate.url, "REPLICATE_API_TOKEN": TOKEN,
                                "REPLICATE_RATE_LIMIT_PER_MINUTE": "6"}).as_dict()
    client = from_settings(config)
    assert client.limiter.interval == 10.0
    assert client.get_prediction("abc")["id"] == "abc"


def test_from_settings_needs_a_token_for_the_real_api() -> None:
    with pytest.raises(ConfigError):
        from_settings(Settings.from_env({}).as_dict())
