"""The local Replicate simulator, over real HTTP: its API, signed webhooks, PNG outputs, faults.

Each test starts an in-process simulator (fast: speed 50) and, where webhooks matter, a small
real HTTP receiver. Signatures are checked with both the standardwebhooks package and the
official replicate package's validator, so the simulator signs exactly as Replicate does.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import replicate
import standardwebhooks
from replicate.webhook import Webhooks, WebhookSigningSecret

from scripts.replicate_sim import Simulator, start_simulator
from scripts.sim.wire import sign
from tests.conftest import FIXTURES

ROOT = Path(__file__).resolve().parent.parent
VECTORS = FIXTURES / "signing_vectors.json"
SDXL = "7762fd07cf82c948538e41f63f77d685e02b063e37e496e96eefd46c929f9bdc"
SPEED = 50.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Delivery:
    headers: dict[str, str]
    body: str

    @property
    def prediction(self) -> dict:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """A real webhook endpoint: records each POST and answers with respond(prediction)."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.respond: Callable[[dict], int] = lambda prediction: 200
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                delivery = Delivery({k.lower(): v for k, v in self.headers.items()}, body)
                code = receiver.respond(delivery.prediction)
                with receiver._changed:
                    receiver.deliveries.append(delivery)
                    receiver._changed.notify_all()
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_port}/webhooks/replicate"

    def wait_for(self, predicate: Callable[[list[Delivery]], bool], timeout: float = 10) -> list[Delivery]:
        with self._changed:
            assert self._changed.wait_for(lambda: predicate(self.deliveries), timeout), self.deliveries
            return list(self.deliveries)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    endpoint = Receiver()
    yield endpoint
    endpoint.stop()


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with start_simulator(speed=SPEED) as simulator:
        yield simulator


def call(sim: Simulator, method: str, path: str, body: object = None, token: str | None = "r8_test",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], object]:
    """One real HTTP request to the simulator: (status, headers, parsed JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(sim.url + path, data=data, method=method, headers=headers or {})
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _NO_PROXY.open(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def create(sim: Simulator, receiver: Receiver | None = None, events: list[str] | None = None,
           path: str = "/v1/predictions", headers: dict[str, str] | None = None,
           **model_input: object) -> dict:
    body: dict[str, object] = {"input": {"prompt": "a studio photo of a corgi", **model_input}}
    if path == "/v1/predictions":
        body["version"] = SDXL
    if receiver:
        body["webhook"] = receiver.url
    if events is not None:
        body["webhook_events_filter"] = events
    status, _, prediction = call(sim, "POST", path, body, headers=headers)
    assert status == 201, prediction
    return prediction  # type: ignore[return-value]


def settle(sim: Simulator, quiet: float = 0.3, timeout: float = 10) -> None:
    """Wait until no delivery attempt has happened for `quiet` seconds."""
    deadline, seen, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(sim.webhook_log)
        if count != seen:
            seen, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.02)


def verify(secret: str, delivery: Delivery) -> None:
    """Both validators must accept: ours would be worthless if only our own code agreed."""
    assert standardwebhooks.Webhook(secret).verify(delivery.body, delivery.headers)["id"]
    Webhooks.validate(headers=delivery.headers, body=delivery.body,
                      secret=WebhookSigningSecret(key=secret), tolerance=300)


def png_size(data: bytes) -> tuple[int, int]:
    """Decode the PNG fully (IHDR + every IDAT row) and return (width, height)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    idat, offset = b"", 8
    while offset < len(data):
        (length,), tag = struct.unpack(">I", data[offset:offset + 4]), data[offset + 4:offset + 8]
        if tag == b"IDAT":
            idat += data[offset + 8:offset + 8 + length]
        offset += 12 + length
    assert (depth, color) == (8, 2)
    assert len(zlib.decompress(idat)) == height * (1 + width * 3)
    return width, height


def fetch(url: str) -> bytes:
    with _NO_PROXY.open(url, timeout=10) as response:
        assert response.headers["Content-Type"] == "image/png"
        return response.read()


# -- the API --------------------------------------------------------------------------------


def test_create_by_version_runs_to_success_with_signed_webhooks(sim: Simulator, receiver: Receiver) -> None:
    status, headers, created = call(sim, "POST", "/v1/predictions", {
        "version": SDXL, "input": {"prompt": "a <corgi> & friends", "num_outputs": 2},
        "webhook": receiver.url})
    assert status == 201
    assert headers["Location"] == created["urls"]["get"] == f"{sim.url}/v1/predictions/{created['id']}"
    assert len(created["id"]) == 26 and created["id"].isalnum() and created["id"].islower()
    assert created["status"] == "starting" and created["model"] == "stability-ai/sdxl"
    assert created["version"] == SDXL and created["output"] is None and created["data_removed"] is False
    assert created["created_at"].endswith("Z") and created["started_at"] is None
    assert created["webhook_events_filter"] == ["start", "output", "logs", "completed"]

    done = sim.wait(created["id"])
    assert done["status"] == "succeeded"
    assert done["output"] == [f"{sim.url}/files/{created['id']}/{n}.png" for n in range(2)]
    assert done["metrics"]["predict_time"] > 0 and done["completed_at"] > done["started_at"]
    assert "Using seed:" in done["logs"] and "100%|██████████| 50/50" in done["logs"]
    assert call(sim, "GET", f"/v1/predictions/{created['id']}")[2] == done

    deliveries = receiver.wait_for(lambda ds: any(d.prediction["status"] == "succeeded" for d in ds))
    for delivery in deliveries:
        verify(sim.secret, delivery)
    assert deliveries[0].prediction["status"] == "starting"
    assert {d.prediction["status"] for d in deliveries} >= {"starting", "processing", "succeeded"}
    assert len({d.webhook_id for d in deliveries}) == len(deliveries)  # one id per event
    # Deliveries go out from a pool of threads, as Replicate's may arrive out of order: a
    # processing webhook can land after the completed one, so find the completed one by status.
    (completed,) = [d for d in deliveries if d.prediction["status"] == "succeeded"]
    assert "\\u003ccorgi\\u003e \\u0026" in completed.body  # Go-style escaping, as Replicate
    assert completed.prediction == done


def test_create_by_model_and_by_deployment(sim: Simulator) -> None:
    by_model = create(sim, path="/v1/models/black-forest-labs/flux-schnell/predictions")
    assert (by_model["model"], by_model["version"]) == ("black-forest-labs/flux-schnell", "hidden")
    by_deployment = create(sim, path="/v1/deployments/acme/image-prod/predictions")
    assert by_deployment["model"] == "stability-ai/sdxl"
    assert sim.wait(by_model["id"])["status"] == sim.wait(by_deployment["id"])["status"] == "succeeded"
    status, _, body = call(sim, "POST", "/v1/models/nobody/nothing/predictions", {"input": {"prompt": "x"}})
    assert (status, body) == (404, {"detail": "The requested resource could not be found.", "status": 404})
    assert call(sim, "GET", "/v1/predictions/doesnotexist")[0] == 404


def test_deployments_can_be_configured_strictly() -> None:
    with start_simulator(speed=SPEED, deployments={"acme/prod": "black-forest-labs/flux-dev"}) as strict:
        assert create(strict, path="/v1/deployments/acme/prod/predictions")["model"] == \
            "black-forest-labs/flux-dev"
        assert call(strict, "POST", "/v1/deployments/acme/other/predictions", {"input": {}})[0] == 404


@pytest.mark.parametrize("body,field", [
    ({"input": {"prompt": "x"}}, "version"),
    ({"version": SDXL, "input": "a corgi"}, "input"),
    ({"version": SDXL, "input": {"prompt": "x", "aspect_ratio": "wide"}}, "input.aspect_ratio"),
    ({"version": SDXL, "input": {"prompt": "x", "num_outputs": 9}}, "input.num_outputs"),
    ({"version": SDXL, "input": {}, "webhook": "not a url"}, "webhook"),
    ({"version": SDXL, "input": {}, "webhook_events_filter": ["finished"]}, "webhook_events_filter.0"),
])
def test_invalid_requests_get_422_like_replicate(sim: Simulator, body: dict, field: str) -> None:
    status, _, error = call(sim, "POST", "/v1/predictions", body)
    assert status == 422 and error["status"] == 422 and error["title"] == "Input validation failed"
    assert field in [f["field"] for f in error["invalid_fields"]] and f"- {field}: " in error["detail"]


def test_unknown_version_and_missing_prompt_are_rejected(sim: Simulator) -> None:
    status, _, error = call(sim, "POST", "/v1/predictions", {"version": "nope", "input": {}})
    assert status == 422 and error["title"] == "Invalid version or not permitted"
    status, _, error = call(sim, "POST", "/v1/models/black-forest-labs/flux-dev/predictions", {"input": {}})
    assert status == 422 and error["detail"] == "- input: prompt is required\n"
    assert call(sim, "POST", "/v1/predictions", None, headers={})[0] == 422


def test_auth_is_required_and_a_configured_token_must_match(sim: Simulator) -> None:
    status, _, error = call(sim, "GET", "/v1/predictions", token=None)
    assert (status, error["title"]) == (401, "Unauthenticated")
    assert call(sim, "GET", "/v1/webhooks/default/secret", token="")[0] == 401
    with start_simulator(speed=SPEED, token="r8_right") as guarded:
        status, _, error = call(guarded, "GET", "/v1/predictions", token="r8_wrong")
        assert status == 401 and "valid" in error["detail"]
        assert call(guarded, "GET", "/v1/predictions", token="r8_right")[0] == 200


def test_webhook_secret_endpoint_matches_the_signing_secret() -> None:
    given = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    with start_simulator(speed=SPEED, secret=given) as fixed:
        assert call(fixed, "GET", "/v1/webhooks/default/secret")[2] == {"key": given}
    with start_simulator(speed=SPEED) as generated:
        key = call(generated, "GET", "/v1/webhooks/default/secret")[2]["key"]
        assert key == generated.secret and key.startswith("whsec_") and key != given


def test_signing_matches_the_standard_webhooks_vectors() -> None:
    vector = next(v for v in json.loads(VECTORS.read_text())["vectors"] if v["name"] == "canonical_valid")
    signature = sign(vector["secret"], vector["webhook_id"], int(vector["webhook_timestamp"]), vector["body"])
    assert signature == vector["webhook_signature"]


def test_cancel_sends_the_completed_webhook(sim: Simulator, receiver: Receiver) -> None:
    prediction = create(sim, receiver, events=["completed"], num_inference_steps=500)
    deadline = time.monotonic() + 5
    while sim.predictions[prediction["id"]]["status"] != "processing" and time.monotonic() < deadline:
        time.sleep(0.01)
    status, _, canceled = call(sim, "POST", f"/v1/predictions/{prediction['id']}/cancel")
    assert status == 200 and canceled["status"] == "canceled" and canceled["completed_at"]
    assert canceled["metrics"]["predict_time"] > 0
    [delivery] = receiver.wait_for(lambda ds: len(ds) == 1)
    assert delivery.prediction["status"] == "canceled"
    verify(sim.secret, delivery)
    assert call(sim, "POST", f"/v1/predictions/{prediction['id']}/cancel")[2]["status"] == "canceled"
    assert call(sim, "POST", "/v1/predictions/nope/cancel")[0] == 404


def test_cancel_after_deadline_aborts_a_prediction_that_never_started(sim: Simulator) -> None:
    prediction = create(sim, headers={"Cancel-After": "100ms"})
    aborted = sim.wait(prediction["id"])
    assert aborted["status"] == "aborted" and aborted["started_at"] is None


def test_a_prompt_saying_fail_fails_with_a_traceback(sim: Simulator, receiver: Receiver) -> None:
    prediction = create(sim, receiver, events=["completed"], prompt="please fail now")
    failed = sim.wait(prediction["id"])
    assert failed["status"] == "failed" and "fail" in failed["error"] and failed["output"] is None
    assert "Traceback (most recent call last)" in failed["logs"]
    [delivery] = receiver.wait_for(lambda ds: len(ds) == 1)
    assert delivery.prediction["status"] == "failed"


@pytest.mark.parametrize("ratio,size", [("1:1", (1024, 1024)), ("3:4", (768, 1024)),
                                        ("9:16", (576, 1024)), ("16:9", (1024, 576)), ("2:3", (680, 1024))])
def test_png_outputs_follow_the_aspect_ratio(sim: Simulator, ratio: str, size: tuple[int, int]) -> None:
    prediction = create(sim, aspect_ratio=ratio)
    [url] = sim.wait(prediction["id"])["output"]
    assert png_size(fetch(url)) == size


def test_the_official_replicate_client_works_against_the_simulator(sim: Simulator) -> None:
    client = replicate.Client(api_token="r8_test", base_url=sim.url)
    client.poll_interval = 0.02
    assert client.webhooks.default.secret().key == sim.secret
    prediction = client.predictions.create(version=f"stability-ai/sdxl:{SDXL}", input={"prompt": "corgi"})
    prediction.wait()
    assert prediction.status == "succeeded" and len(prediction.output) == 1
    by_model = client.models.predictions.create(model="black-forest-labs/flux-schnell", input={"prompt": "x"})
    by_deployment = client.deployments.predictions.create(deployment="acme/prod", input={"prompt": "x"})
    assert by_model.version == "hidden" and by_deployment.status == "starting"


# -- webhook delivery rules -----------------------------------------------------------------


def test_only_the_completed_webhook_is_retried_with_the_same_id(sim: Simulator, receiver: Receiver) -> None:
    answers = iter([500, 503])
    receiver.respond = lambda p: next(answers, 200) if p["status"] == "succeeded" else 500
    prediction = create(sim, receiver, events=["start", "completed"])
    deliveries = receiver.wait_for(lambda ds: sum(d.prediction["status"] == "succeeded" for d in ds) == 3)
    completed = [d for d in deliveries if d.prediction["status"] == "succeeded"]
    assert len({d.webhook_id for d in completed}) == 1
    for delivery in completed:
        verify(sim.secret, delivery)
    settle(sim)
    log = [a for a in sim.webhook_log if a.prediction_id == prediction["id"]]
    assert [(a.event, a.attempt, a.response_code) for a in log] == [
        ("start", 1, 500), ("completed", 1, 500), ("completed", 2, 503), ("completed", 3, 200)]


def test_events_filter_and_throttle_of_logs_webhooks(receiver: Receiver) -> None:
    with start_simulator(speed=10) as slow:
        prediction = create(slow, receiver, events=["logs"])
        slow.wait(prediction["id"])
        settle(slow)
        log = [a for a in slow.webhook_log if a.prediction_id == prediction["id"]]
    assert {a.event for a in log} == {"logs"} and 5 < len(log) < 50  # 50 steps, throttled
    gaps = [b.emitted_at - a.emitted_at for a, b in zip(log, log[1:], strict=False)]
    assert min(gaps) >= 0.5 / 10  # Replicate's 500 ms, in simulated time


# -- faults ---------------------------------------------------------------------------------


def test_ratelimit_answers_429_with_retry_after(sim: Simulator) -> None:
    status, _, faults = call(sim, "POST", "/_sim/faults", {"faults": ["ratelimit"], "rate_limit": 2,
                                                           "rate_window": 1})
    assert status == 200 and faults["enabled"] == ["ratelimit"] and faults["rate_limit"] == 2
    create(sim)
    create(sim)
    status, headers, body = call(sim, "POST", "/v1/predictions", {"version": SDXL, "input": {}})
    assert status == 429 and headers["Retry-After"] == "1"
    assert body == {"detail": "Request was throttled. Expected available in 1 second.", "status": 429,
                    "retry_after": 1}
    sim.set_faults([])
    create(sim)
    assert call(sim, "POST", "/_sim/faults", {"faults": ["flood"]})[0] == 400


def test_duplicate_delivers_each_webhook_two_or_three_times(sim: Simulator, receiver: Receiver) -> None:
    sim.set_faults("duplicate")
    prediction = create(sim, receiver, events=["start", "completed"])
    sim.wait(prediction["id"])
    settle(sim)
    log = [a for a in sim.webhook_log if a.prediction_id == prediction["id"]]
    copies: dict[str, int] = {}
    for attempt in log:
        copies[attempt.webhook_id] = copies.get(attempt.webhook_id, 0) + 1
    assert len(copies) == 2 and all(2 <= n <= 3 for n in copies.values())
    assert len(receiver.deliveries) == len(log)
    for delivery in receiver.deliveries:
        verify(sim.secret, delivery)


def test_reorder_lets_an_earlier_state_arrive_after_the_terminal_one(sim: Simulator,
                                                                      receiver: Receiver) -> None:
    sim.set_faults({"reorder": True})
    prediction = create(sim, receiver)
    sim.wait(prediction["id"])
    deliveries = receiver.wait_for(lambda ds: any(d.prediction["status"] == "starting" for d in ds))
    statuses = [d.prediction["status"] for d in deliveries]
    assert statuses.index("succeeded") < statuses.index("starting")
    settle(sim)
    events = [a.event for a in sim.webhook_log if a.prediction_id == prediction["id"]]
    assert events.index("completed") < events.index("start")
    only_start = create(sim, receiver, events=["start"])  # held start still goes out at the end
    receiver.wait_for(lambda ds: any(d.prediction["id"] == only_start["id"] for d in ds))


def test_drop_loses_webhooks_including_start_and_completed(sim: Simulator, receiver: Receiver) -> None:
    sim.set_faults({"faults": ["drop"], "drop_rate": 1.0})
    prediction = create(sim, receiver)
    sim.wait(prediction["id"])
    settle(sim)
    log = [a for a in sim.webhook_log if a.prediction_id == prediction["id"]]
    assert {"start", "completed"} <= {a.event for a in log}
    assert all(a.dropped and a.response_code is None for a in log)
    assert receiver.deliveries == []


def _dropped_pattern(seed: int, receiver: Receiver) -> list[tuple[str, str, bool]]:
    with start_simulator(speed=SPEED, seed=seed, faults={"faults": ["drop"], "drop_rate": 0.5}) as seeded:
        for _ in range(4):
            seeded.wait(create(seeded, receiver, events=["start", "completed"])["id"])
        settle(seeded)
        return sorted((a.prediction_id, a.event, a.dropped) for a in seeded.webhook_log)


def test_drop_is_repeatable_with_a_seed(receiver: Receiver) -> None:
    first, second = _dropped_pattern(7, receiver), _dropped_pattern(7, receiver)
    assert first == second
    assert {dropped for _, _, dropped in first} == {True, False}


def test_fail_fault_fails_a_share_of_predictions(sim: Simulator) -> None:
    sim.set_faults({"faults": ["fail"], "fail_rate": 1.0})
    failed = sim.wait(create(sim)["id"])
    assert failed["status"] == "failed" and "CUDA error" in failed["error"]
    sim.set_faults({"fail_rate": 0.0})
    assert sim.wait(create(sim)["id"])["status"] == "succeeded"


# -- the command line -----------------------------------------------------------------------


def test_command_line_serves_and_stops_cleanly_on_sigterm() -> None:
    command = [sys.executable, str(ROOT / "scripts" / "replicate_sim.py"), "--port", "0", "--speed", "20",
               "--faults", "duplicate,drop", "--log-level", "WARNING"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        api = line.split()[2]
        with _NO_PROXY.open(api.removesuffix("/v1") + "/_sim/faults", timeout=5) as response:
            assert json.loads(response.read())["enabled"] == ["drop", "duplicate"]
    finally:
        process.terminate()
    assert process.wait(timeout=10) == 0


def test_help_describes_the_api() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "replicate_sim.py"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "/v1/webhooks/default/secret" in result.stdout
