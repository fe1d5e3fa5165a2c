"""Fuzz cases for the public surfaces, shared by tests/test_fuzz.py (a small, derandomized
set in CI) and scripts/bench/fuzz.py (100,000+ cases).

Each family is a Hypothesis strategy of requests and a `Fuzzer.run_*` that sends one
through the Flask test client against a real database and returns what was wrong with
the answer. The oracle for signatures is computed here (HMAC-SHA256 over
`id.timestamp.body`, any one v1 signature, five-minute window), not by the library the
service uses, so a webhook stored without a valid signature cannot go unnoticed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from tests.conftest import PAYLOADS
from tests.signing import SECRET

KEY = base64.b64decode(SECRET.removeprefix("whsec_"))
SIGNED = ("webhook-id", "webhook-timestamp", "webhook-signature")
TEMPLATES = [json.loads(p.read_text()) for p in sorted(PAYLOADS.glob("*.json"))
             if json.loads(p.read_text()).get("status")]
STATUSES = ["starting", "processing", "succeeded", "failed", "canceled", "aborted"]

# Texts that broke services before: NUL, lone surrogates, huge or odd numbers, deep nesting.
NASTY_JSON = [b'{"id": "p\\u0000", "status": "starting"}', b'{"id": "\\ud800", "status": "starting"}',
              b'{"id": "p1", "status": "starting", "logs": "\\u0000"}', b'{"id": "p1", "status": "starting",'
              b' "metrics": {"predict_time": 1e999999}}',
              b'{"id": "p1", "status": "starting", "x": -1e-999999}',
              b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000, b"\xef\xbb\xbf{}",
              b'{"id": "p1", "status": "starting", "created_at": "2024-13-45T99:99:99Z"}',
              b'{"id": "p1", "status": "starting", "created_at": "+275760-09-13T00:00:00Z"}',
              b'{"id": "p1", "status": "starting", "created_at": "0001-01-01T00:00:00-23:59"}',
              b'{"id": 1, "status": "starting"}', b'{"id": "p1", "status": "succeeded", "output": "\\udfff"}',
              b"\xff\xfe{\x00}\x00", b"NaN", b'{"id": "p1", "status": "starting", "n": NaN}']

_HEADER_TEXT = st.text(st.characters(blacklist_characters="\r\n", codec="latin-1"), max_size=120)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20)


@dataclass
class Outcome:
    endpoint: str
    status: int
    problems: list[str] = field(default_factory=list)


def now_ts() -> str:
    return str(int(time.time()))


def sign(raw: bytes, webhook_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    """Sign any bytes (tests/signing.py signs text only) as Replicate would."""
    wid, ts = webhook_id or f"msg_{uuid.uuid4().hex}", now_ts()
    digest = hmac.new(KEY, f"{wid}.{ts}.".encode() + raw, hashlib.sha256).digest()
    return raw, {"webhook-id": wid, "webhook-timestamp": ts, "content-type": "application/json",
                 "webhook-signature": "v1," + base64.b64encode(digest).decode()}


def verifies(raw: bytes, headers: dict[str, str], now: float | None = None) -> bool:
    """The test's own Standard Webhooks oracle."""
    wid, ts, sigs = (headers.get(name, "") for name in SIGNED)
    if not (wid and ts and sigs) or not ts.isdigit() or abs(int(ts) - (now or time.time())) > 300:
        return False
    try:
        message = f"{wid}.{ts}.".encode() + raw
        raw.decode()
    except UnicodeError:
        return False
    expected = base64.b64encode(hmac.new(KEY, message, hashlib.sha256).digest()).decode()
    return any(part == f"v1,{expected}" for part in sigs.split(" "))


@st.composite
def predictions(draw: st.DrawFn) -> dict[str, Any]:
    """A real payload with fields replaced, removed or added."""
    body = dict(draw(st.sampled_from(TEMPLATES)), id=f"fz{uuid.uuid4().hex[:16]}")
    for name in draw(st.lists(st.sampled_from(["id", "status", "created_at", "started_at", "completed_at",
                                                "output", "logs", "metrics", "error", "input", "extra"]),
                              max_size=4, unique=True)):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            body.pop(name, None)
        elif choice == 1 and name == "status":
            body[name] = draw(st.sampled_from(STATUSES))
        elif choice == 1 and name.endswith("_at"):
            body[name] = draw(st.datetimes(timezones=st.just(None))).isoformat() + "Z"
        else:
            body[name] = draw(json_values)
    return body


@st.composite
def webhook_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind <= 4:
        return json.dumps(draw(predictions()), ensure_ascii=draw(st.booleans())).encode()
    if kind <= 6:
        return json.dumps(draw(json_values)).encode()
    if kind == 7:
        return draw(st.sampled_from(NASTY_JSON))
    return draw(st.binary(max_size=300))


@st.composite
def header_mutations(draw: st.DrawFn) -> dict[str, str | None]:
    """For each signed header: keep it (absent key), drop it (None) or replace it."""
    changes: dict[str, str | None] = {}
    for name in draw(st.lists(st.sampled_from(SIGNED), min_size=1, max_size=3, unique=True)):
        how = draw(st.integers(0, 3))
        if how == 0:
            changes[name] = None
        elif how == 1:
            changes[name] = draw(_HEADER_TEXT)
        elif name == "webhook-timestamp":
            changes[name] = str(int(time.time()) + draw(st.integers(-10**6, 10**6)))
        elif name == "webhook-signature":
            changes[name] = draw(st.sampled_from(["v1,", "v1,AAAA", "v1a,x", "v2,abc v1,", ",", "v1,===="]))
        else:
            changes[name] = draw(st.sampled_from(["", " ", "msg_other", "x" * 300]))
    return changes


idempotency_keys = st.none() | st.text(st.characters(blacklist_characters="\r\n"), max_size=210)
job_queries = st.fixed_dictionaries({}, optional={
    "status": st.sampled_from(["pending", "completed", "nope", ""]) | _HEADER_TEXT,
    "model": _HEADER_TEXT, "limit": st.integers(-5, 500).map(str) | _HEADER_TEXT,
    "cursor": _HEADER_TEXT | st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()),
})


@st.composite
def job_requests(draw: st.DrawFn) -> Any:
    """Mostly job-shaped JSON with fields replaced; sometimes anything at all."""
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)
    body: dict[str, Any] = {"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse"}}
    fields = {"model": st.sampled_from(["a/b", "x", "a/b/c", ""]) | st.text(max_size=30),
              "version": st.text(alphabet="0123456789abcdef", min_size=63, max_size=65)
              | st.text(max_size=20),
              "deployment": st.sampled_from(["o/d", "o"]), "input": json_values,
              "aspect_ratio": st.sampled_from(["1:1", "3:4", "0:1", "101:1", "16:9 "]) | st.text(max_size=8),
              "count": st.integers(-3, 60) | json_values,
              "postprocess": st.fixed_dictionaries(
                  {"mode": st.sampled_from(["auto", "upscale", "resize", "x"])},
                  optional={"width": st.integers(-1, 10**6)}) | json_values,
              "then": st.fixed_dictionaries({"input": st.dictionaries(st.text(max_size=5), st.sampled_from(
                  ["{{outputs[0]}}", "{{outputs[99999]}}", "{{x}}", "{{"]))}) | json_values,
              "metadata": json_values, "unknown": json_values}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
        body[name] = draw(fields[name])
    return body


class Fuzzer:
    """Sends cases through a test client and checks the answers; counts events as it goes."""

    def __init__(self, client: Any, conn: Any) -> None:
        self.client, self.conn = client, conn

    def events(self) -> int:
        return self.conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"]

    def check(self, endpoint: str, response: Any) -> Outcome:
        outcome = Outcome(endpoint, response.status_code)
        if response.status_code >= 500:
            outcome.problems.append(f"{response.status_code}: {response.get_data()[:300]!r}")
        elif response.status_code >= 400:
            body = response.get_json(silent=True)
            if not (isinstance(body, dict) and isinstance(body.get("error"), str)
                    and isinstance(body.get("message"), str) and body["message"]):
                outcome.problems.append(f"{response.status_code} without a JSON error and message: "
                                        f"{response.get_data()[:200]!r}")
        return outcome

    def post_webhook(self, endpoint: str, raw: bytes, headers: dict[str, str], query: str = "") -> Outcome:
        before = self.events()
        response = self.client.post(f"/webhooks/replicate{query}", data=raw, headers=headers)
        outcome = self.check(endpoint, response)
        stored = self.events() - before
        recorded = response.status_code == 200 and response.get_json()["status"] == "recorded"
        if stored != int(recorded):
            outcome.problems.append(f"{stored} events stored for a {response.status_code} answer")
        if response.status_code == 200 and not verifies(raw, headers):
            outcome.problems.append("a delivery without a valid signature was accepted")
        if response.status_code not in (200, 400, 401, 413):
            outcome.problems.append(f"unexpected status {response.status_code}")
        return outcome

    def run_signed_body(self, raw: bytes, query: str = "") -> Outcome:
        """Any body, correctly signed: 200 (a prediction), 400 or 413; never a 5xx."""
        raw, headers = sign(raw)
        outcome = self.post_webhook("webhook signed body", raw, headers, query)
        if outcome.status == 401 and verifies(raw, headers):
            outcome.problems.append("a correctly signed delivery was refused 401")
        return outcome

    def run_headers(self, raw: bytes, changes: dict[str, str | None]) -> Outcome:
        """A signed body with its signature headers dropped or replaced."""
        raw, headers = sign(raw)
        for name, value in changes.items():
            headers.pop(name)
            if value is not None:
                headers[name] = value
        outcome = self.post_webhook("webhook headers", raw, headers)
        if outcome.status != 401 and not verifies(raw, headers):
            outcome.problems.append(f"a broken signature answered {outcome.status}, not 401")
        return outcome

    def run_job_create(self, body: Any, key: str | None) -> Outcome:
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        headers = {"Idempotency-Key": key} if key is not None else {}
        response = self.client.post("/api/jobs", data=data, content_type="application/json", headers=headers)
        outcome = self.check("POST /api/jobs", response)
        if response.status_code not in (200, 201, 400, 413, 422):
            outcome.problems.append(f"unexpected status {response.status_code}")
        return outcome

    def run_job_read(self, path: str, query: dict[str, str], method: str = "GET") -> Outcome:
        response = self.client.open(path, method=method, query_string=query)
        outcome = self.check(f"{method} /api/jobs/...", response)
        if response.status_code not in (200, 202, 400, 404, 405, 409, 422):
            outcome.problems.append(f"unexpected status {response.status_code}")
        return outcome


job_paths = st.one_of(
    st.just("/api/jobs"),
    st.uuids().map(lambda u: f"/api/jobs/{u}"), st.uuids().map(lambda u: f"/api/jobs/{u}/events"),
    st.text(st.characters(codec="ascii", blacklist_characters="/?#%\r\n"), max_size=40).map(
        lambda t: f"/api/jobs/{t}"))
