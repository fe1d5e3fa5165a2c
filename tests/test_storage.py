"""service.storage and service.files: local files written atomically and served safely, and
Supabase Storage over real HTTP against a local server that answers as Storage's documented
upload API does."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

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
    SupabaseStorage,
    check_path,
    object_path,
    storage_from_config,
)
from tests.test_downloads import JPEG, PNG, WEBP

KEY = "sb_secret_ServiceRoleKeyThatMustNeverBeLogged0123456789"
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


# --- SupabaseStorage against a local Storage API ----------------------------------------------

class FakeStorage:
    """Answers like Supabase Storage's upload and bucket endpoints; `script` overrides replies."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.buckets: set[str] = {"outputs"}
        self.script: deque[tuple[int, dict]] = deque()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_StorageHandler,), {"owner": self}))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _StorageHandler(BaseHTTPRequestHandler):
    owner: FakeStorage

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.owner.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers),
                                    "body": body})
        if self.owner.script:
            return self.answer(*self.owner.script.popleft())
        if self.headers.get("Authorization") != f"Bearer {KEY}" or self.headers.get("apikey") != KEY:
            return self.answer(400, {"statusCode": "403", "error": "Unauthorized", "message": "invalid key"})
        if self.path == "/storage/v1/bucket":
            return self.create_bucket(json.loads(body))
        prefix = "/storage/v1/object/"
        bucket, _, path = unquote(self.path.removeprefix(prefix)).partition("/")
        if not self.path.startswith(prefix) or not path:
            return self.answer(404, {"message": "route not found"})
        self.upload(bucket, path, body)

    def do_GET(self) -> None:
        bucket, _, path = unquote(self.path.removeprefix("/storage/v1/object/public/")).partition("/")
        stored = self.owner.objects.get((bucket, path))
        if stored is None:
            return self.answer(400, {"statusCode": "404", "error": "not_found", "message": "not found"})
        self.send_response(200)
        self.send_header("Content-Type", stored["content_type"])
        self.send_header("Content-Length", str(len(stored["body"])))
        self.end_headers()
        self.wfile.write(stored["body"])

    def upload(self, bucket: str, path: str, body: bytes) -> None:
        if bucket not in self.owner.buckets:
            return self.answer(400, {"statusCode": "404", "error": "Bucket not found",
                                     "message": "Bucket not found"})
        if (bucket, path) in self.owner.objects and self.headers.get("x-upsert") != "true":
            return self.answer(400, {"statusCode": "409", "error": "Duplicate",
                                     "message": "The resource already exists"})
        self.owner.objects[(bucket, path)] = {"body": body, "content_type": self.headers["Content-Type"],
                                              "cache_control": self.headers.get("cache-control")}
        self.answer(200, {"Key": f"{bucket}/{path}", "Id": str(uuid.uuid4())})

    def create_bucket(self, body: dict) -> None:
        if body["id"] in self.owner.buckets:
            return self.answer(400, {"statusCode": "409", "error": "Duplicate",
                                     "message": "The resource already exists"})
        self.owner.buckets.add(body["id"])
        self.answer(200, {"name": body["id"]})

    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake() -> Iterator[FakeStorage]:
    server = FakeStorage()
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


def test_upload_uses_the_documented_endpoint(fake: FakeStorage, service_log: io.StringIO) -> None:
    stored = SupabaseStorage(fake.url, KEY, "outputs").put(PATH, PNG, "image/png")
    assert stored.url == f"{fake.url}/storage/v1/object/public/outputs/{PATH}"
    assert (stored.path, stored.bytes) == (PATH, len(PNG))
    [sent] = fake.requests
    assert (sent["method"], sent["path"], sent["body"]) == ("POST", f"/storage/v1/object/outputs/{PATH}", PNG)
    headers = sent["headers"]
    assert (headers["Authorization"], headers["apikey"]) == (f"Bearer {KEY}", KEY)
    assert (headers["x-upsert"], headers["Content-Type"], headers["cache-control"]) == (
        "true", "image/png", "max-age=3600")
    public = requests.get(stored.url, timeout=5)
    assert (public.content, public.headers["Content-Type"]) == (PNG, "image/png")
    assert "output stored" in service_log.getvalue() and KEY not in service_log.getvalue()


def test_a_retry_overwrites_the_same_object(fake: FakeStorage) -> None:
    storage = SupabaseStorage(fake.url, KEY)
    first = storage.put(PATH, PNG, "image/png")
    second = storage.put(PATH, JPEG, "image/jpeg")
    assert first.url == second.url
    assert list(fake.objects) == [("outputs", PATH)]
    assert fake.objects[("outputs", PATH)]["body"] == JPEG
    assert [r["path"] for r in fake.requests] == [f"/storage/v1/object/outputs/{PATH}"] * 2


def test_missing_bucket_then_ensure_bucket(fake: FakeStorage) -> None:
    storage = SupabaseStorage(fake.url, KEY, "renders")
    with pytest.raises(StorageRejected, match="Bucket not found") as caught:
        storage.put(PATH, PNG, "image/png")
    assert (caught.value.transient, caught.value.storage_status) == (False, 404)
    assert storage.ensure_bucket() is True
    assert json.loads(fake.requests[-1]["body"]) == {"id": "renders", "name": "renders", "public": True}
    assert fake.requests[-1]["path"] == "/storage/v1/bucket"
    assert storage.ensure_bucket() is False
    assert storage.put(PATH, PNG, "image/png").bytes == len(PNG)


@pytest.mark.parametrize(("status", "body", "error", "transient"), [
    (503, {"message": "upstream down"}, StorageUnavailable, True),
    (500, {"statusCode": "500", "error": "internal"}, StorageUnavailable, True),
    (429, {"message": "slow down"}, StorageUnavailable, True),
    (400, {"statusCode": "503", "error": "DatabaseTimeout"}, StorageUnavailable, True),
    (403, {"statusCode": "403", "error": "Unauthorized"}, StorageRejected, False),
    (413, {"statusCode": "413", "error": "Payload too large"}, StorageRejected, False),
])
def test_failures_are_named_and_classified(fake: FakeStorage, status: int, body: dict, error: type,
                                           transient: bool) -> None:
    fake.script.append((status, body))
    with pytest.raises(error, match=f"HTTP {status}") as caught:
        SupabaseStorage(fake.url, KEY).put(PATH, PNG, "image/png")
    assert caught.value.transient is transient


def test_the_key_never_reaches_errors_or_logs(fake: FakeStorage, service_log: io.StringIO) -> None:
    fake.script.append((401, {"message": f"invalid JWT {KEY}"}))  # a server that echoes the key
    storage = SupabaseStorage(fake.url, KEY)
    with pytest.raises(StorageRejected) as rejected:
        storage.put(PATH, PNG, "image/png")
    closed = SupabaseStorage(_closed_port_url(), KEY)
    with pytest.raises(StorageUnavailable) as unavailable:
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


def test_supabase_refuses_unsafe_paths_without_a_request(fake: FakeStorage) -> None:
    with pytest.raises(InvalidObjectPath):
        SupabaseStorage(fake.url, KEY).put("../outputs/x.png", PNG, "image/png")
    assert fake.requests == []


def test_check_path_accepts_what_object_path_makes() -> None:
    path = object_path(str(uuid.uuid4()), "q8x9", 3, "webp", original=True)
    assert check_path(path) == path
    assert not os.path.isabs(path)
