"""service.storage and service.files: local files written atomically and served safely, and
Supabase Storage over real HTTP against a local server that answers as Storage's documented
upload API does."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from flask import Flask

from service import create_app, errors, files
from service.errors import ConfigError
from service.logs import ContextFormatter
from service.storage import (
    InvalidObjectPath,
    LocalStorage,
    StorageError,
    StorageRejected,
    StorageUnavailable,
    check_path,
    object_path,
    storage_from_config,
)
from service.supabase_storage import SupabaseStorage
from tests.storage_server import KEY, StorageServer
from tests.test_downloads import JPEG, PNG, WEBP
from tests.workload import LIFECYCLE, bodies, create_job, process_output, submit, webhook

PATH = "jobs/job-1/p1-0.png"


# --- object paths -----------------------------------------------------------------------------

def test_object_paths() -> None:
    job = str(uuid.UUID(int=7))
    assert object_path(job, "abc123", 0, "png") == f"jobs/{job}/abc123-0.png"
    assert object_path(job, "abc123", 2, ".JPG", original=True) == f"jobs/{job}/abc123-2.original.jpg"


@pytest.mark.parametrize("args", [("../x", "p", 0, "png"), ("j", "p/q", 0, "png"), ("j", "p", -1, "png"),
                                  ("j", "p", 0, "p/ng"), ("j", "", 0, "png"), ("j", "p", True, "png")])
def test_object_path_refuses_unsafe_parts(args: tuple) -> None:
    with pytest.raises(InvalidObjectPath):
        object_path(*args)


# --- LocalStorage -----------------------------------------------------------------------------

def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob(".*")]


def test_local_put_writes_and_returns_the_files_url(tmp_path: Path) -> None:
    stored = LocalStorage(tmp_path / "files").put(PATH, PNG, "image/png")
    assert (stored.url, stored.path, stored.bytes) == (f"/files/{PATH}", PATH, len(PNG))
    assert (tmp_path / "files" / PATH).read_bytes() == PNG
    assert leftovers(tmp_path) == []
    public = LocalStorage(tmp_path / "files", "https://jobs.example.com/").put(PATH, PNG, "image/png")
    assert public.url == f"https://jobs.example.com/files/{PATH}"


def test_local_put_overwrites(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put(PATH, PNG, "image/png")
    storage.put(PATH, JPEG, "image/png")
    assert (tmp_path / PATH).read_bytes() == JPEG


def test_readers_never_see_half_a_file(tmp_path: Path) -> None:
    storage, first, second = LocalStorage(tmp_path), b"a" * 2_000_000, b"b" * 2_000_000
    storage.put(PATH, first, "image/png")
    seen: set[bytes] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            data = (tmp_path / PATH).read_bytes()
            seen.add(data[:1] + data[-1:] + str(len(data)).encode())

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(30):
        storage.put(PATH, second if i % 2 else first, "image/png")
    done.set()
    reader.join()
    assert seen <= {b"aa2000000", b"bb2000000"}
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_no_temp_file_and_a_named_error(tmp_path: Path) -> None:
    (tmp_path / PATH).mkdir(parents=True)  # a directory where the file should go
    with pytest.raises(StorageError, match="could not write") as caught:
        LocalStorage(tmp_path).put(PATH, PNG, "image/png")
    assert caught.value.transient is False
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("path", ["../escape.png", "jobs/../../escape.png", "/etc/escape.png", "jobs//x.png",
                                  "jobs/.hidden.png", "jobs\\..\\escape.png", "", "jobs/x.png/", ".",
                                  "jobs/%2e%2e/x.png", "jobs/x\x00.png", "jobs/ü.png", "a/" * 300 + "x.png"])
def test_local_refuses_unsafe_paths(tmp_path: Path, path: str) -> None:
    root = tmp_path / "files"
    with pytest.raises(InvalidObjectPath) as caught:
        LocalStorage(root).put(path, PNG, "image/png")
    assert caught.value.transient is False
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_content_type_must_be_a_media_type(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="type/subtype"):
        LocalStorage(tmp_path).put(PATH, PNG, "image/png\r\nX-Evil: 1")


# --- GET /files/<path> ------------------------------------------------------------------------

@pytest.fixture
def files_app(tmp_path: Path) -> Flask:
    app = Flask(__name__)
    app.config.update(TESTING=True, STORAGE_DIR=str(tmp_path / "files"))
    errors.register_handlers(app)
    app.register_blueprint(files.bp)
    return app


@pytest.mark.parametrize(("name", "body", "content_type"), [
    ("p1-0.png", PNG, "image/png"), ("p1-0.original.jpg", JPEG, "image/jpeg"),
    ("p1-1.webp", WEBP, "image/webp"),
])
def test_files_route_serves_stored_bytes(files_app: Flask, name: str, body: bytes, content_type: str) -> None:
    stored = LocalStorage(files_app.config["STORAGE_DIR"]).put(f"jobs/job-1/{name}", body, content_type)
    response = files_app.test_client().get(stored.url)
    assert response.status_code == 200
    assert (response.data, response.mimetype) == (body, content_type)
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("url", ["/files/jobs/job-1/none.png", "/files/..%2fsecret.txt",
                                 "/files/%2e%2e/secret.txt", "/files/jobs/..%2f..%2fsecret.txt",
                                 "/files/jobs/.p1-0.png.tmp", "/files/%2fetc%2fpasswd", "/files/jobs"])
def test_files_route_404s_missing_and_unsafe_paths(files_app: Flask, tmp_path: Path, url: str) -> None:
    (tmp_path / "secret.txt").write_text("outside the storage directory")
    root = Path(files_app.config["STORAGE_DIR"], "jobs")
    root.mkdir(parents=True)
    (root / ".p1-0.png.tmp").write_bytes(PNG)
    response = files_app.test_client().get(url, follow_redirects=True)  # "//" is merged by a redirect
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


def test_files_route_in_the_service_app(db_url: str, tmp_path: Path) -> None:
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "STORAGE_DIR": str(tmp_path)})
    try:
        if "files" not in app.blueprints:  # until create_app registers it
            app.register_blueprint(files.bp)
        stored = storage_from_config(app.config).put(PATH, PNG, "image/png")
        response = app.test_client().get(stored.url)
        assert (response.status_code, response.data, response.mimetype) == (200, PNG, "image/png")
    finally:
        app.extensions["db_pool"].close()


# --- configuration ----------------------------------------------------------------------------

def test_storage_from_config(tmp_path: Path) -> None:
    local = storage_from_config({"DATA_DIR": str(tmp_path)})
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "files"
    assert storage_from_config({"STORAGE_DIR": str(tmp_path / "x")}).root == tmp_path / "x"
    url_only = {"SUPABASE_URL": "https://p.supabase.co", "DATA_DIR": str(tmp_path)}
    assert isinstance(storage_from_config(url_only), LocalStorage)
    remote = storage_from_config({"SUPABASE_URL": "https://p.supabase.co/", "SUPABASE_SERVICE_ROLE_KEY": KEY})
    assert isinstance(remote, SupabaseStorage) and remote.bucket == "outputs"
    assert remote.public_url(PATH) == f"https://p.supabase.co/storage/v1/object/public/outputs/{PATH}"
    assert KEY not in repr(remote)
    custom = storage_from_config({"SUPABASE_URL": "https://p.supabase.co", "SUPABASE_SERVICE_ROLE_KEY": KEY,
                                  "STORAGE_BUCKET": "renders"})
    assert custom.bucket == "renders"


SUPABASE = {"SUPABASE_URL": "https://p.supabase.co", "SUPABASE_SERVICE_ROLE_KEY": KEY}


@pytest.mark.parametrize("config", [{"SUPABASE_SERVICE_ROLE_KEY": KEY},
                                    SUPABASE | {"SUPABASE_URL": "p.supabase.co"},
                                    SUPABASE | {"STORAGE_BUCKET": "../other"}])
def test_storage_misconfiguration_is_a_config_error(config: dict) -> None:
    with pytest.raises(ConfigError) as caught:
        storage_from_config(config)
    assert KEY not in str(caught.value)


# --- SupabaseStorage (supabase-py) against a local Storage API --------------------------------

@pytest.fixture
def fake() -> Iterator[StorageServer]:
    server = StorageServer()
    yield server
    server.close()


@pytest.fixture
def service_log() -> Iterator[io.StringIO]:
    """Everything the service's loggers write, formatted as in production (extras included)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ContextFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("service")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(previous)


def test_upload_uses_the_documented_endpoint(fake: StorageServer, service_log: io.StringIO) -> None:
    stored = SupabaseStorage(fake.url, KEY, "outputs").put(PATH, PNG, "image/png")
    assert stored.url == f"{fake.url}/storage/v1/object/public/outputs/{PATH}"
    assert (stored.path, stored.bytes) == (PATH, len(PNG))
    upload, lookup = fake.requests  # the upload, then (once) whether the bucket is public
    assert (upload["method"], upload["path"]) == ("POST", f"/storage/v1/object/outputs/{PATH}")
    assert (lookup["method"], lookup["path"]) == ("GET", "/storage/v1/bucket/outputs")
    headers = upload["headers"]
    assert (headers["authorization"], headers["apikey"]) == (f"Bearer {KEY}", KEY)
    assert headers["x-upsert"] == "true"
    assert fake.objects[("outputs", PATH)] == {"body": PNG, "content_type": "image/png",
                                               "cache_control": "max-age=3600"}
    public = requests.get(stored.url, timeout=5)
    assert (public.content, public.headers["Content-Type"]) == (PNG, "image/png")
    assert "output stored" in service_log.getvalue() and KEY not in service_log.getvalue()


def test_a_retry_overwrites_the_same_object(fake: StorageServer) -> None:
    storage = SupabaseStorage(fake.url, KEY, public=True)
    first = storage.put(PATH, PNG, "image/png")
    second = storage.put(PATH, JPEG, "image/jpeg")
    assert first.url == second.url
    assert list(fake.objects) == [("outputs", PATH)]
    assert fake.objects[("outputs", PATH)]["body"] == JPEG
    assert [r["path"] for r in fake.requests] == [f"/storage/v1/object/outputs/{PATH}"] * 2


def test_without_upsert_storage_refuses_a_second_upload(fake: StorageServer) -> None:
    """What upsert is for: the server really refuses an overwrite without it."""
    client = SupabaseStorage(fake.url, KEY, public=True)._client.storage.from_("outputs")
    client.upload(PATH, PNG, {"content-type": "image/png"})
    with pytest.raises(Exception, match="already exists"):
        client.upload(PATH, JPEG, {"content-type": "image/jpeg"})
    assert fake.objects[("outputs", PATH)]["body"] == PNG


def test_a_private_bucket_gives_signed_urls_that_serve_and_expire(fake: StorageServer) -> None:
    fake.buckets["private"] = False
    storage = SupabaseStorage(fake.url, KEY, "private", signed_url_seconds=2)  # public: asks the bucket
    stored = storage.put(PATH, PNG, "image/png")
    assert stored.url == f"{fake.url}/storage/v1/object/authenticated/private/{PATH}"
    assert requests.get(stored.url, timeout=5).status_code == 400  # not without a key
    assert requests.get(f"{fake.url}/storage/v1/object/public/private/{PATH}", timeout=5).status_code == 400
    shown = storage.shown_urls([stored.url, "https://elsewhere.example/x.png", None])
    assert list(shown) == [stored.url]
    signed = shown[stored.url]
    assert signed.startswith(f"{fake.url}/storage/v1/object/sign/private/{PATH}?token=")
    served = requests.get(signed, timeout=5)
    assert (served.status_code, served.content) == (200, PNG)
    before = len(fake.requests)
    assert storage.shown_urls([stored.url]) == shown  # reused while young: no request
    assert len(fake.requests) == before
    time.sleep(3.1)
    expired = requests.get(signed, timeout=5)
    assert (expired.status_code, expired.json()["message"]) == (400, "jwt expired")
    renewed = storage.shown_urls([stored.url])[stored.url]  # past half its life: signed again
    assert renewed != signed and requests.get(renewed, timeout=5).content == PNG


def test_storage_public_false_is_not_asked_and_signs(fake: StorageServer) -> None:
    storage = storage_from_config({"SUPABASE_URL": fake.url, "SUPABASE_SERVICE_ROLE_KEY": KEY,
                                   "STORAGE_PUBLIC": "false", "STORAGE_SIGNED_URL_SECONDS": "600"})
    stored = storage.put(PATH, PNG, "image/png")
    assert "/object/authenticated/outputs/" in stored.url
    assert [r["method"] for r in fake.requests] == ["POST"]  # no bucket lookup
    storage.shown_urls([stored.url])
    sign = fake.requests[-1]
    assert sign["path"] == "/storage/v1/object/sign/outputs"
    assert json.loads(sign["body"]) == {"paths": [PATH], "expiresIn": "600"}


def test_api_and_dashboard_show_signed_urls_of_a_private_bucket(fake: StorageServer, db_url: str) -> None:
    fake.buckets["outputs"] = False
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "SUPABASE_URL": fake.url,
                      "SUPABASE_SERVICE_ROLE_KEY": KEY})
    try:
        stored = app.extensions["storage"].put(PATH, PNG, "image/png")
        with app.extensions["db_pool"].connection() as conn:
            job_id = finished_job(conn, stored.url)
        client = app.test_client()
        [output] = client.get(f"/api/jobs/{job_id}").get_json()["outputs"]
        [listed] = client.get("/api/jobs").get_json()["jobs"][0]["outputs"]
        [dashboard] = client.get(f"/api/dashboard/jobs/{job_id}/outputs").get_json()["outputs"]
        for url in (output["url"], listed["url"], dashboard["url"]):
            assert "/object/sign/outputs/" in url and requests.get(url, timeout=5).content == PNG
        with app.extensions["db_pool"].connection() as conn:  # the event keeps the object's own URL
            data = conn.execute("SELECT data FROM events WHERE type = 'output.processed'").fetchone()["data"]
        assert data["url"] == stored.url
    finally:
        app.extensions["db_pool"].close()
    fresh = create_app({"TESTING": True, "DATABASE_URL": db_url, "SUPABASE_URL": fake.url,
                        "SUPABASE_SERVICE_ROLE_KEY": KEY})  # nothing signed yet
    try:
        fake.script.append((503, {"message": "down"}))  # signing fails: the page still answers
        response = fresh.test_client().get(f"/api/jobs/{job_id}")
        assert response.status_code == 200 and response.get_json()["outputs"][0]["url"] == stored.url
    finally:
        fresh.extensions["db_pool"].close()


def finished_job(conn, url: str) -> str:
    job_id = str(uuid.uuid4())
    states = bodies(LIFECYCLE, "p1")
    create_job(conn, job_id)
    submit(conn, job_id, states[0])
    for n, body in enumerate(states[1:]):
        webhook(conn, job_id, body, key=f"m{n}")
    process_output(conn, job_id, "p1", 0, url=url)
    return job_id


def test_missing_bucket_names_the_setting_then_ensure_bucket(fake: StorageServer) -> None:
    storage = SupabaseStorage(fake.url, KEY, "renders")
    with pytest.raises(StorageRejected, match="Bucket not found; check STORAGE_BUCKET") as caught:
        storage.put(PATH, PNG, "image/png")
    assert (caught.value.transient, caught.value.storage_status) == (False, 404)
    assert storage.ensure_bucket() is True
    assert json.loads(fake.requests[-1]["body"]) == {"id": "renders", "name": "renders", "public": True}
    assert fake.requests[-1]["path"] == "/storage/v1/bucket"
    assert storage.ensure_bucket() is False
    assert storage.put(PATH, PNG, "image/png").bytes == len(PNG)


def test_a_wrong_key_names_the_setting_and_not_the_key(fake: StorageServer) -> None:
    wrong = "sb_secret_NotTheProjectsKey0000000000000000000000000000"
    with pytest.raises(StorageRejected, match="check SUPABASE_SERVICE_ROLE_KEY") as caught:
        SupabaseStorage(fake.url, wrong).put(PATH, PNG, "image/png")
    assert wrong not in str(caught.value) and caught.value.storage_status == 403


@pytest.mark.parametrize(("status", "body", "error", "transient"), [
    (503, {"message": "upstream down"}, StorageUnavailable, True),
    (500, {"statusCode": "500", "error": "internal", "message": "boom"}, StorageUnavailable, True),
    (429, {"message": "slow down"}, StorageUnavailable, True),
    (400, {"statusCode": "503", "error": "DatabaseTimeout", "message": "timeout"}, StorageUnavailable, True),
    (403, {"statusCode": "403", "error": "Unauthorized", "message": "no"}, StorageRejected, False),
    (413, {"statusCode": "413", "error": "Payload too large", "message": "big"}, StorageRejected, False),
])
def test_failures_are_named_and_classified(fake: StorageServer, status: int, body: dict, error: type,
                                           transient: bool) -> None:
    fake.script.append((status, body))
    with pytest.raises(error, match=f"HTTP {status}") as caught:
        SupabaseStorage(fake.url, KEY).put(PATH, PNG, "image/png")
    assert caught.value.transient is transient


def test_the_key_never_reaches_errors_or_logs(fake: StorageServer, service_log: io.StringIO) -> None:
    fake.script.append((401, {"message": f"invalid JWT {KEY}"}))  # a server that echoes the key
    storage = SupabaseStorage(fake.url, KEY)
    with pytest.raises(StorageRejected) as rejected:
        storage.put(PATH, PNG, "image/png")
    closed = SupabaseStorage(_closed_port_url(), KEY)
    with pytest.raises(StorageUnavailable, match="check SUPABASE_URL") as unavailable:
        closed.put(PATH, PNG, "image/png")
    assert unavailable.value.transient is True
    for text in (str(rejected.value), repr(rejected.value), str(unavailable.value), repr(storage),
                 repr(closed), service_log.getvalue()):
        assert KEY not in text
    assert "invalid JWT ***" in str(rejected.value)


def _closed_port_url() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()
    return f"http://127.0.0.1:{port}"


def test_supabase_refuses_unsafe_paths_without_a_request(fake: StorageServer) -> None:
    with pytest.raises(InvalidObjectPath):
        SupabaseStorage(fake.url, KEY).put("../outputs/x.png", PNG, "image/png")
    assert fake.requests == []


def test_check_path_accepts_what_object_path_makes() -> None:
    path = object_path(str(uuid.uuid4()), "q8x9", 3, "webp", original=True)
    assert check_path(path) == path
    assert not os.path.isabs(path)
