"""The process_output task through the whole worker path: a succeeded webhook enqueues one task
per output URL, a real Worker claims and runs them against a local HTTP server standing in for
replicate.delivery, files land in STORAGE_DIR and the job's outputs are recorded exactly once."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from service import create_app, queue
from service.cli import handlers, worker_context
from service.worker import Context, Worker, worker_name
from tests.origin import Origin, Reply, decoded, picture, png, succeeded

HTML = b"<!doctype html><html><body>Access denied</body></html>"


class Rig:
    """The service's worker side: an app (for its pool, config and /files), a Worker with the
    real handlers, and a connection for the test's own reads and writes."""

    def __init__(self, db_url: str, storage: Path, **config: Any) -> None:
        self.storage = storage
        self.app = create_app({"TESTING": True, "DATABASE_URL": db_url, "OUTPUT_ALLOWED_HOSTS": "127.0.0.1",
                               "STORAGE_DIR": str(storage), "REPLICATE_API_BASE_URL": "http://127.0.0.1:9/v1",
                               "REPLICATE_API_TOKEN": "test-token", "SUPABASE_URL": None,
                               "SUPABASE_SERVICE_ROLE_KEY": None, **config})
        self.ctx = self.context()
        self.worker = Worker(self.ctx, handlers(), lease_seconds=30, poll_seconds=0.1)

    def context(self) -> Context:
        """A worker's context; each call names another worker."""
        return worker_context(self.app, f"{worker_name()}:{uuid.uuid4().hex[:6]}")

    def drain(self) -> int:
        """Run every task that is ready; how many ran."""
        ran = 0
        while self.worker.run_once():
            ran += 1
        return ran

    def stored(self, url: str) -> bytes:
        """The file behind a recorded URL, as GET /files/... serves it."""
        response = self.app.test_client().get(urlsplit(url).path)
        assert response.status_code == 200, url
        return response.data

    def close(self) -> None:
        self.app.extensions["db_pool"].close()


@pytest.fixture
def make_rig(db_url: str, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(**config: Any) -> Rig:
        rigs.append(Rig(db_url, tmp_path / "files", **config))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


@pytest.fixture
def elsewhere() -> Iterator[Origin]:
    """A second server, on an address OUTPUT_ALLOWED_HOSTS does not list."""
    try:
        server = Origin("127.0.0.2")
    except OSError:
        pytest.skip("127.0.0.2 is not available on this machine")
    yield server
    server.close()


def events_of(conn, job_id: str, kind: str) -> list[dict]:
    return conn.execute("SELECT data, metadata FROM events WHERE stream = %s AND type = %s ORDER BY position",
                        (job_id, kind)).fetchall()


def tasks_of(conn, job_id: str) -> list[dict]:
    return conn.execute("SELECT * FROM tasks WHERE job_id = %s AND kind = 'process_output' ORDER BY id",
                        (job_id,)).fetchall()


def job_row(conn, job_id: str) -> dict:
    return conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()


# -- sizes end to end ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "source", "target"), [
    ("1:1", (1024, 1024), (2048, 2048)),
    ("3:4", (768, 1024), (1080, 1440)),
    ("9:16", (576, 1024), (1080, 1920)),
    ("16:9", (1024, 576), (1920, 1080)),
    ("5:7", (728, 1024), (1371, 1920)),
])
def test_outputs_come_out_at_the_exact_size_for_the_jobs_aspect_ratio(rig, origin, conn, ratio, source,
                                                                       target):
    served = png(picture(*source))
    job_id, prediction_id = succeeded(conn, [origin.serve("/out-0.png", served)], aspect_ratio=ratio)
    assert [t["status"] for t in tasks_of(conn, job_id)] == ["queued"]

    assert rig.drain() == 1

    [event] = events_of(conn, job_id, "output.processed")
    data = event["data"]
    assert (data["width"], data["height"]) == target
    assert data["prediction_id"] == prediction_id and data["index"] == 0
    assert set(data["timings"]) == {"download_ms", "process_ms", "store_ms"}
    processed = rig.stored(data["url"])
    assert decoded(processed).shape[:2] == (target[1], target[0])
    assert data["bytes"] == len(processed)
    assert (rig.storage / urlsplit(data["url"]).path.removeprefix("/files/")).read_bytes() == processed
    assert rig.stored(data["original_url"]) == served  # the original, byte for byte
    assert data["original_bytes"] == len(served)
    [task] = tasks_of(conn, job_id)
    assert (task["status"], task["attempts"]) == ("done", 1)
    job = job_row(conn, job_id)
    assert (job["status"], job["outputs_processed"], job["outputs_failed"]) == ("completed", 1, 0)
    assert [(o["url"], o["width"], o["height"]) for o in job["outputs"]] == [(data["url"], *target)]


# -- pixel formats survive the whole path ----------------------------------------------------------------


def test_alpha_survives(rig, origin, conn):
    pixels = picture(512, 512, channels=4)
    pixels[:, :128, 3] = 0  # the left quarter is transparent
    pixels[:, 128:, 3] = 255
    job_id, _ = succeeded(conn, [origin.serve("/alpha.png", png(pixels))])
    rig.drain()
    [event] = events_of(conn, job_id, "output.processed")
    out = decoded(rig.stored(event["data"]["url"]))
    assert out.shape == (1024, 1024, 4)
    assert out[:, :250, 3].max() == 0 and out[:, 262:, 3].min() == 255


def test_grayscale_stays_grayscale(rig, origin, conn):
    job_id, _ = succeeded(conn, [origin.serve("/gray.png", png(picture(300, 400, channels=1)))],
                          aspect_ratio="3:4")
    rig.drain()
    [event] = events_of(conn, job_id, "output.processed")
    out = decoded(rig.stored(event["data"]["url"]))
    assert out.shape == (1440, 1080) and out.dtype == np.uint8


def test_sixteen_bit_stays_sixteen_bit(rig, origin, conn):
    pixels = picture(256, 256, dtype=np.uint16)
    assert (pixels % 257).any()  # really 16-bit: not 8-bit values scaled up
    job_id, _ = succeeded(conn, [origin.serve("/deep.png", png(pixels))])
    rig.drain()
    [event] = events_of(conn, job_id, "output.processed")
    out = decoded(rig.stored(event["data"]["url"]))
    assert out.shape == (512, 512, 3) and out.dtype == np.uint16
    assert (out % 257).any()
    assert decoded(rig.stored(event["data"]["original_url"])).dtype == np.uint16


# -- outputs that must not be processed ------------------------------------------------------------------

CAP = 100_000  # DOWNLOAD_MAX_BYTES in the failure cases


def noise_png(size: int) -> bytes:
    """A PNG that barely compresses: random pixels."""
    return png(np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _truncated(origin: Origin, elsewhere: Origin) -> str:
    whole = png(picture(64, 64))
    return origin.serve("/cut.png", whole[: len(whole) // 2])


def _html(origin: Origin, elsewhere: Origin) -> str:
    return origin.serve("/page.png", Reply(HTML, content_type="text/html; charset=utf-8"))


def _too_large(origin: Origin, elsewhere: Origin) -> str:
    body = noise_png(256)
    assert len(body) > CAP
    return origin.serve("/huge.png", body)


def _host_not_allowed(origin: Origin, elsewhere: Origin) -> str:
    return elsewhere.serve("/x.png", png(picture(64, 64)))


def _localhost(origin: Origin, elsewhere: Origin) -> str:
    origin.serve("/named.png", png(picture(64, 64)))  # allowed only as 127.0.0.1, not by this name
    return f"http://localhost:{origin.port}/named.png"


def _redirect_elsewhere(origin: Origin, elsewhere: Origin) -> str:
    return origin.redirect("/moved.png", elsewhere.serve("/x.png", png(picture(64, 64))))


@pytest.mark.parametrize(("make_url", "words"), [
    (_truncated, "CorruptImage: the PNG is cut short"),
    (_html, "NotAnImage: the content is not a PNG, JPEG, WebP or GIF image (declared as text/html)"),
    (_too_large, f"DownloadTooLarge: the output is {{size}} bytes; the limit is {CAP}"),
    (_host_not_allowed, "DisallowedURL: host 127.0.0.2 is not allowed (see OUTPUT_ALLOWED_HOSTS)"),
    (_localhost, "DisallowedURL: host localhost is not allowed (see OUTPUT_ALLOWED_HOSTS)"),
    (_redirect_elsewhere, "DisallowedURL: redirect refused: host 127.0.0.2 is not allowed"),
], ids=["truncated", "html", "too_large", "host_not_allowed", "localhost", "redirect_elsewhere"])
def test_an_output_that_cannot_be_processed_fails_at_once_with_its_reason(
        make_rig, origin, elsewhere, conn, make_url, words):
    rig = make_rig(DOWNLOAD_MAX_BYTES=str(CAP))
    url = make_url(origin, elsewhere)
    job_id, prediction_id = succeeded(conn, [url])

    assert rig.drain() == 1  # permanent: no retry is queued

    [event] = events_of(conn, job_id, "output.failed")
    error = event["data"]["error"]
    if "{size}" in words:
        words = words.format(size=len(noise_png(256)))
    assert error.startswith(words), error
    assert event["data"] | {"error": None} == {"prediction_id": prediction_id, "index": 0, "source_url": url,
                                               "error": None, "attempts": 1}
    assert events_of(conn, job_id, "output.processed") == []
    [task] = tasks_of(conn, job_id)
    assert (task["status"], task["attempts"], task["last_error"]) == ("failed", 1, error)
    job = job_row(conn, job_id)
    assert (job["status"], job["outputs_processed"], job["outputs_failed"]) == ("failed", 0, 1)
    assert job["error"] == error
    assert elsewhere.seen == []  # a disallowed host is never sent a request, not even via a redirect
    assert "/named.png" not in origin.seen
    assert not any(rig.storage.rglob("*.png"))


def test_a_job_with_one_good_and_one_bad_output_completes_with_what_it_has(rig, origin, conn):
    good = origin.serve("/out-0.png", png(picture(512, 512)))
    bad = origin.serve("/out-1.png", Reply(HTML, content_type="text/html"))
    job_id, _ = succeeded(conn, [good, bad])

    assert rig.drain() == 2

    assert [e["data"]["index"] for e in events_of(conn, job_id, "output.processed")] == [0]
    assert [e["data"]["index"] for e in events_of(conn, job_id, "output.failed")] == [1]
    assert sorted(t["status"] for t in tasks_of(conn, job_id)) == ["done", "failed"]
    job = job_row(conn, job_id)
    assert (job["status"], job["outputs_processed"], job["outputs_failed"]) == ("completed", 1, 1)
    assert job["error"] is None and [o["index"] for o in job["outputs"]] == [0]


# -- retries and repeats ---------------------------------------------------------------------------------


def test_a_transient_failure_is_retried_and_the_output_processed_once(rig, origin, conn):
    busy = Reply(b"busy", status=503, content_type="text/plain")
    job_id, _ = succeeded(conn, [origin.serve("/out-0.png", busy, png(picture(256, 256)))])

    assert rig.drain() == 1
    [task] = tasks_of(conn, job_id)
    assert (task["status"], task["attempts"]) == ("queued", 1)
    assert "answered HTTP 503" in task["last_error"]
    assert conn.execute("SELECT run_after > now() AS later FROM tasks WHERE id = %s",
                        (task["id"],)).fetchone()["later"]  # backoff: not before its time
    assert rig.drain() == 0
    assert events_of(conn, job_id, "output.processed") == events_of(conn, job_id, "output.failed") == []

    conn.execute("UPDATE tasks SET run_after = now() WHERE id = %s", (task["id"],))
    assert rig.drain() == 1

    assert origin.requests_for("/out-0.png") == 2
    [event] = events_of(conn, job_id, "output.processed")
    assert event["metadata"]["attempt"] == 2
    [task] = tasks_of(conn, job_id)
    assert (task["status"], task["attempts"]) == ("done", 2)
    assert job_row(conn, job_id)["status"] == "completed"


def test_a_task_run_by_two_workers_records_its_output_once(rig, origin, conn):
    """The first worker stalls past its lease; the second takes the task over and finishes it;
    then the first one finishes too."""
    job_id, _ = succeeded(conn, [origin.serve("/out-0.png", png(picture(256, 256)))])
    slow = rig.context()
    with rig.ctx.pool.connection() as c:
        stale = queue.claim(c, slow.worker, 30)
    assert stale is not None and stale.attempts == 1
    conn.execute("UPDATE tasks SET lease_until = now() - interval '1 second' WHERE id = %s", (stale.id,))

    assert rig.drain() == 1  # the lease ran out: claimed again, run, recorded
    handlers()["process_output"].run(slow, stale)  # the first worker wakes up and does it all again

    assert origin.requests_for("/out-0.png") == 2
    [event] = events_of(conn, job_id, "output.processed")
    assert event["metadata"]["attempt"] == 2  # the takeover's record stands; the late one added nothing
    [task] = tasks_of(conn, job_id)
    assert (task["status"], task["attempts"], task["locked_by"]) == ("done", 2, None)
    job = job_row(conn, job_id)
    assert (job["status"], job["outputs_processed"]) == ("completed", 1)
    assert sorted(p.name for p in rig.storage.rglob("*") if p.is_file()) == sorted(
        [f"{event['data']['prediction_id']}-0.png", f"{event['data']['prediction_id']}-0.original.png"])
