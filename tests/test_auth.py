"""Supabase user access tokens on the jobs API: HS256 with the project's JWT secret, and
RS256/ES256 with keys fetched over real HTTP from a local server publishing a JWKS the way
Supabase Auth does (/auth/v1/.well-known/jwks.json). A user creates and sees only their
own jobs; an API key sees every job."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service import create_app
from service.errors import ConfigError

SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"
ALICE = "6f1c3a0e-1d2b-4c5d-8e9f-0a1b2c3d4e5f"
BOB = "0b7e6d5c-4a39-4281-9f0e-1d2c3b4a5968"
BODY = {"model": "stability-ai/sdxl", "input": {"prompt": "a lighthouse"}}
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def claims(sub: str = ALICE, **extra: object) -> dict:
    now = int(time.time())
    return {"sub": sub, "role": "authenticated", "aud": "authenticated", "iat": now,
            "exp": now + 3600, **extra}


def hs256(sub: str = ALICE, secret: str = SECRET, **extra: object) -> str:
    return jwt.encode(claims(sub, **extra), secret, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api(db_url: str) -> Iterator:
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "API_KEYS": ("k1",),
                      "SUPABASE_JWT_SECRET": SECRET})
    yield app.test_client()
    app.extensions["db_pool"].close()


def create(client, token: str, **headers: str) -> dict:
    response = client.post("/api/jobs", json=BODY, headers={**bearer(token), **headers})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_a_user_creates_a_job_they_own(api, conn):
    job = create(api, hs256(ALICE))
    row = conn.execute("SELECT owner_id FROM jobs WHERE id = %s", (job["id"],)).fetchone()
    assert str(row["owner_id"]) == ALICE
    data = conn.execute("SELECT data FROM events WHERE type = 'job.created'").fetchone()["data"]
    assert data["owner_id"] == ALICE
    created_with_key = api.post("/api/jobs", json=BODY, headers=bearer("k1")).get_json()
    row = conn.execute("SELECT owner_id FROM jobs WHERE id = %s", (created_with_key["id"],)).fetchone()
    assert row["owner_id"] is None


def test_a_user_sees_only_their_own_jobs_and_another_users_are_404(api, conn):
    mine, theirs = create(api, hs256(ALICE)), create(api, hs256(BOB))
    listed = api.get("/api/jobs", headers=bearer(hs256(ALICE))).get_json()["jobs"]
    assert [j["id"] for j in listed] == [mine["id"]]
    for path in (f"/api/jobs/{theirs['id']}", f"/api/jobs/{theirs['id']}/events"):
        response = api.get(path, headers=bearer(hs256(ALICE)))
        assert response.status_code == 404 and response.get_json()["error"] == "not_found"
    events_before = conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"]
    refused = api.post(f"/api/jobs/{theirs['id']}/cancel", headers=bearer(hs256(ALICE)))
    assert refused.status_code == 404
    assert conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == events_before
    assert api.get(f"/api/jobs/{mine['id']}", headers=bearer(hs256(ALICE))).status_code == 200
    assert api.get(f"/api/jobs/{mine['id']}/events", headers=bearer(hs256(ALICE))).status_code == 200
    assert api.post(f"/api/jobs/{mine['id']}/cancel", headers=bearer(hs256(ALICE))).status_code == 202
    everyone = api.get("/api/jobs", headers=bearer("k1")).get_json()["jobs"]
    assert {j["id"] for j in everyone} == {mine["id"], theirs["id"]}


def test_an_api_key_creates_a_job_for_the_user_it_names_who_then_sees_it(api, conn):
    response = api.post("/api/jobs", json={**BODY, "owner": BOB, "count": 2}, headers=bearer("k1"))
    assert response.status_code == 201, response.get_json()
    job = response.get_json()
    assert job["owner"] == BOB
    row = conn.execute("SELECT owner_id FROM jobs WHERE id = %s", (job["id"],)).fetchone()
    assert str(row["owner_id"]) == BOB
    data = conn.execute("SELECT data FROM events WHERE type = 'job.created'").fetchone()["data"]
    assert data["owner_id"] == BOB and "owner" not in data
    # its submissions are queued in Bob's line of the fair queue
    keys = conn.execute("SELECT owner_key FROM tasks WHERE job_id = %s", (job["id"],)).fetchall()
    assert [str(k["owner_key"]) for k in keys] == [BOB, BOB]
    seen = api.get("/api/jobs", headers=bearer(hs256(BOB))).get_json()["jobs"]
    assert [j["id"] for j in seen] == [job["id"]]
    assert api.get(f"/api/jobs/{job['id']}", headers=bearer(hs256(ALICE))).status_code == 404
    unowned = api.post("/api/jobs", json=BODY, headers=bearer("k1")).get_json()
    assert unowned["owner"] is None


def test_a_user_may_name_only_themselves_as_owner(api, conn):
    mine = api.post("/api/jobs", json={**BODY, "owner": ALICE.upper()}, headers=bearer(hs256(ALICE)))
    assert mine.status_code == 201 and mine.get_json()["owner"] == ALICE
    events_before = conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"]
    refused = api.post("/api/jobs", json={**BODY, "owner": BOB}, headers=bearer(hs256(ALICE)))
    assert refused.status_code == 403
    assert refused.get_json()["error"] == "forbidden"
    assert "only an API key may create a job for another user" in refused.get_json()["message"]
    assert conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == events_before
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 1


@pytest.mark.parametrize(("owner", "message"), [
    ("bob", "must be a user id"),
    ("6f1c3a0e-1d2b-4c5d-8e9f", "must be a user id"),
    (12345, "must be a user id"),
    ("00000000-0000-0000-0000-000000000000", "the nil uuid is no user's id"),
])
def test_a_bad_owner_is_refused_saying_why_and_writes_nothing(api, conn, owner, message):
    for token in ("k1", hs256(ALICE)):
        response = api.post("/api/jobs", json={**BODY, "owner": owner}, headers=bearer(token))
        assert response.status_code == 422, response.get_json()
        assert response.get_json()["fields"] == {"owner": [message + (
            ": a UUID like 3f2b8c1e-5a7d-4e9b-8c2f-1d6a9e0b4c7f" if message.startswith("must") else "")]}
    assert conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == 0


def test_the_same_idempotency_key_from_two_users_makes_two_jobs(api):
    first = create(api, hs256(ALICE), **{"Idempotency-Key": "order-1"})
    second = create(api, hs256(BOB), **{"Idempotency-Key": "order-1"})
    again = api.post("/api/jobs", json=BODY, headers={**bearer(hs256(ALICE)), "Idempotency-Key": "order-1"})
    assert first["id"] != second["id"]
    assert (again.status_code, again.get_json()["id"]) == (200, first["id"])


@pytest.mark.parametrize(("token", "message"), [
    (hs256(exp=int(time.time()) - 120), "expired"),
    (hs256(secret="another-secret-of-at-least-thirty-two-chars"), "Signature verification failed"),
    (hs256(aud="somebody-else"), "Audience doesn't match"),
    (hs256(role="anon"), "role must be authenticated"),
    (hs256(sub="not-a-uuid"), "subject is not a user id"),
    (jwt.encode({k: v for k, v in claims().items() if k != "exp"}, SECRET, algorithm="HS256"), "exp"),
    (jwt.encode(claims(), None, algorithm="none"), "'none' are not accepted"),
    (jwt.encode(claims(), SECRET * 2, algorithm="HS512"), "'HS512' are not accepted"),
    ("a.b.c", "not valid"),
])
def test_a_bad_user_token_is_401_saying_why_and_writes_nothing(api, conn, token, message):
    for response in (api.get("/api/jobs", headers=bearer(token)),
                     api.post("/api/jobs", json=BODY, headers=bearer(token))):
        assert response.status_code == 401
        assert response.get_json()["error"] == "unauthorized"
        assert message in response.get_json()["message"]
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == 0


def test_user_tokens_alone_lock_the_api_and_the_dashboard(db_url):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "SUPABASE_JWT_SECRET": SECRET})
    client = app.test_client()
    try:
        assert client.get("/api/jobs").status_code == 401
        assert client.get("/api/jobs", headers=bearer(hs256())).status_code == 200
        assert client.get("/api/dashboard/health", headers=bearer(hs256())).status_code == 401
        assert client.get("/api/dashboard/config").get_json()["auth_required"] is True
    finally:
        app.extensions["db_pool"].close()


def test_a_short_jwt_secret_stops_startup(db_url):
    with pytest.raises(ConfigError, match="SUPABASE_JWT_SECRET is too short"):
        create_app({"TESTING": True, "DATABASE_URL": db_url, "SUPABASE_JWT_SECRET": "short"})


# --- JWKS over HTTP -----------------------------------------------------------------------

def public_jwk(key, kid: str, alg: str) -> dict:
    algorithm = jwt.algorithms.ECAlgorithm if alg == "ES256" else jwt.algorithms.RSAAlgorithm
    return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, "alg": alg, "use": "sig"}


class AuthServer(ThreadingHTTPServer):
    """Supabase Auth's key endpoint: GET /auth/v1/.well-known/jwks.json."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), JwksHandler)
        self.keys = [public_jwk(EC_KEY, "ec-1", "ES256"), public_jwk(RSA_KEY, "rsa-1", "RS256")]
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class JwksHandler(BaseHTTPRequestHandler):
    server: AuthServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests += 1
        if self.path != "/auth/v1/.well-known/jwks.json":
            self.send_error(404)
            return
        body = json.dumps({"keys": self.server.keys}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def auth_server() -> Iterator[AuthServer]:
    server = AuthServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def jwks_api(db_url: str, auth_server: AuthServer) -> Iterator:
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "SUPABASE_URL": auth_server.url,
                      "SUPABASE_JWKS_URL": f"{auth_server.url}/auth/v1/.well-known/jwks.json"})
    yield app.test_client()
    app.extensions["db_pool"].close()


def hand_signed_hs256(payload: dict, secret: bytes) -> str:
    """HS256 by hand: PyJWT itself refuses to use a public key as an HMAC secret."""
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    head = part(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "ec-1"}).encode())
    body = part(json.dumps(payload).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{part(mac)}"


def signed(key, alg: str, kid: str, issuer: str, sub: str = ALICE) -> str:
    return jwt.encode(claims(sub, iss=f"{issuer}/auth/v1"), key, algorithm=alg, headers={"kid": kid})


@pytest.mark.parametrize(("key", "alg", "kid"), [(EC_KEY, "ES256", "ec-1"), (RSA_KEY, "RS256", "rsa-1")])
def test_asymmetric_tokens_verify_with_keys_fetched_from_the_jwks(jwks_api, auth_server, key, alg, kid):
    job = create(jwks_api, signed(key, alg, kid, auth_server.url))
    again = jwks_api.get(f"/api/jobs/{job['id']}", headers=bearer(signed(key, alg, kid, auth_server.url)))
    assert again.status_code == 200
    assert auth_server.requests == 1  # the keys are cached
    other = jwks_api.get(f"/api/jobs/{job['id']}",
                         headers=bearer(signed(key, alg, kid, auth_server.url, sub=BOB)))
    assert other.status_code == 404


def test_a_jwks_token_is_refused_for_an_unknown_key_a_forged_signature_or_another_issuer(
        jwks_api, auth_server):
    impostor = ec.generate_private_key(ec.SECP256R1())
    public_pem = EC_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    cases = [
        (signed(EC_KEY, "ES256", "ec-9", auth_server.url), "signing key is unknown"),
        (signed(impostor, "ES256", "ec-1", auth_server.url), "Signature verification failed"),
        (signed(EC_KEY, "ES256", "ec-1", "https://other.supabase.co"), "issuer"),
        # the public key used as an HMAC secret: HS256 is not accepted without the JWT secret
        (hand_signed_hs256(claims(), public_pem), "'HS256' are not accepted"),
    ]
    for token, message in cases:
        response = jwks_api.get("/api/jobs", headers=bearer(token))
        assert response.status_code == 401, token
        assert message in response.get_json()["message"]
    assert auth_server.requests == 2  # the first fetch, and one refresh for the unknown kid
    for n in range(5):
        made_up = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": f"made-up-{n}"})
        assert jwks_api.get("/api/jobs", headers=bearer(made_up)).status_code == 401
    assert auth_server.requests == 2  # made-up kids do not each fetch the keys again


def test_when_the_jwks_cannot_be_fetched_the_answer_is_503(db_url):
    with ThreadingHTTPServer(("127.0.0.1", 0), JwksHandler) as closed:
        url = f"http://127.0.0.1:{closed.server_address[1]}/auth/v1/.well-known/jwks.json"
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "SUPABASE_JWKS_URL": url})
    try:
        token = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})
        response = app.test_client().get("/api/jobs", headers=bearer(token))
        assert (response.status_code, response.get_json()["error"]) == (503, "keys_unavailable")
    finally:
        app.extensions["db_pool"].close()


def test_a_user_id_is_never_taken_from_an_unverified_token(api):
    unsigned = jwt.encode(claims(str(uuid.uuid4())), "x" * 40, algorithm="HS256")
    assert api.get("/api/jobs", headers=bearer(unsigned)).status_code == 401


def test_a_key_added_at_supabase_after_the_first_fetch_is_picked_up(jwks_api, auth_server):
    rsa_jwk = auth_server.keys.pop()
    assert create(jwks_api, signed(EC_KEY, "ES256", "ec-1", auth_server.url))
    auth_server.keys.append(rsa_jwk)  # the project rotates in a new signing key
    created = jwks_api.post("/api/jobs", json=BODY,
                            headers=bearer(signed(RSA_KEY, "RS256", "rsa-1", auth_server.url)))
    assert created.status_code == 201 and auth_server.requests == 2
