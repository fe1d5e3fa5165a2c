"""Oversized bodies are refused early on both public surfaces: a declared Content-Length
over the limit is answered 413 without reading the body, and a body without one (chunked)
is cut off just past the limit, never read whole."""

from __future__ import annotations

import io
import json

import pytest
from werkzeug.test import EnvironBuilder, run_wsgi_app

from service import create_app, schemas
from tests.signing import SECRET, signed

WEBHOOK_LIMIT = 1024 * 1024


class Unreadable(io.RawIOBase):
    """A request body that fails the test if the service reads any of it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise AssertionError("the body was read")


class Endless(io.RawIOBase):
    """A body with no end; counts what was read of it."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        buffer[:] = b" " * len(buffer)
        self.read_bytes += len(buffer)
        return len(buffer)


@pytest.fixture
def app(db_url):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "REPLICATE_WEBHOOK_SECRET": SECRET,
                      "WEBHOOK_MAX_BYTES": WEBHOOK_LIMIT})
    yield app
    app.extensions["db_pool"].close()


def post(app, path: str, stream: io.RawIOBase, length: int | None) -> tuple[int, dict]:
    """POST straight through WSGI as gunicorn would call it: the test client insists on
    a seekable body, and a chunked one reaches the app as wsgi.input_terminated."""
    _, headers = signed(b"{}")
    environ = EnvironBuilder(path=path, method="POST", headers=headers,
                             content_type="application/json").get_environ()
    environ["wsgi.input"] = stream
    if length is None:
        environ.pop("CONTENT_LENGTH", None)
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
        environ["wsgi.input_terminated"] = True
    else:
        environ["CONTENT_LENGTH"] = str(length)
    body, status, _ = run_wsgi_app(app, environ, buffered=True)
    return int(status.split()[0]), json.loads(b"".join(body))


def events(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM events").fetchone()["n"]


@pytest.mark.parametrize("path,limit", [("/api/jobs", schemas.MAX_BODY_BYTES),
                                        ("/webhooks/replicate", WEBHOOK_LIMIT)])
def test_a_declared_length_over_the_limit_is_413_unread(app, conn, path, limit):
    status, answer = post(app, path, Unreadable(), limit + 1)
    assert status == 413 and answer["message"]
    assert events(conn) == 0


@pytest.mark.parametrize("path,limit", [("/api/jobs", schemas.MAX_BODY_BYTES),
                                        ("/webhooks/replicate", WEBHOOK_LIMIT)])
def test_a_body_without_a_length_is_cut_off_past_the_limit(app, conn, path, limit):
    body = Endless()
    status, answer = post(app, path, body, None)
    assert status == 413 and answer["message"]
    assert body.read_bytes <= limit + 64 * 1024  # read in chunks: at most one past the limit
    assert events(conn) == 0
