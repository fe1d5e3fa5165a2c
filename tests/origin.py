"""What post-processing tests and the imaging benchmark need from the outside world: a local
HTTP server standing in for replicate.delivery (it serves bytes by path and misbehaves on
purpose when asked to), images for it to serve, and the news that a prediction made them."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np

from tests.conftest import new_job_id
from tests.workload import bodies, create_job, webhook


@dataclass
class Reply:
    """One answer: status, body and headers; `stall` sends the headers and half the body, then
    waits for `release` before sending the rest (a download caught mid-body)."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "image/png"
    stall: bool = False


def picture(width: int, height: int, channels: int = 3, dtype: type = np.uint8) -> np.ndarray:
    """A gradient with a little noise: cheap to encode, and not one flat colour."""
    top = np.iinfo(dtype).max
    rng = np.random.default_rng(width * 7919 + height)
    ramp = np.linspace(0.1, 0.9, width)[None, :] * np.linspace(0.5, 1.0, height)[:, None]
    planes = [np.clip(ramp * (0.6 + 0.2 * c) + rng.normal(0, 0.01, ramp.shape), 0, 1)
              for c in range(channels)]
    pixels = (np.dstack(planes) if channels > 1 else planes[0]) * top
    return np.rint(pixels).astype(dtype)


def png(pixels: np.ndarray, compression: int = 1) -> bytes:
    ok, buffer = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise ValueError("cv2 could not encode these pixels as PNG")
    return buffer.tobytes()


def decoded(data: bytes) -> np.ndarray:
    """The pixels as stored: alpha, grayscale and 16-bit kept."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError("cv2 could not decode the data")
    return pixels


def succeeded(conn, urls: list[str], aspect_ratio: str = "1:1", **fields: Any) -> tuple[str, str]:
    """A job, and its prediction's succeeded webhook with these output URLs: (job id, prediction id)."""
    job_id, prediction_id = new_job_id(), f"p{uuid.uuid4().hex[:20]}"
    create_job(conn, job_id, aspect_ratio=aspect_ratio, **fields)
    [body] = bodies(["succeeded_sdxl_polled_list_output"], prediction_id)
    body["output"] = urls
    webhook(conn, job_id, body, key=f"msg_{prediction_id}")
    return job_id, prediction_id


class Origin:
    """Serves the replies queued per path, in order, the last one again once they run out.
    `seen` lists every path requested; `stalled` is set when a stalling reply is half sent."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.seen: list[str] = []
        self.stalled, self.release = threading.Event(), threading.Event()
        self._replies: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"origin": self})
        self.httpd = ThreadingHTTPServer((host, 0), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def serve(self, path: str, *replies: Reply | bytes) -> str:
        """Answer path with these replies in turn (bytes: a 200 PNG); returns its URL."""
        with self._lock:
            self._replies[path] = [r if isinstance(r, Reply) else Reply(r) for r in replies]
        return self.url(path)

    def redirect(self, path: str, location: str) -> str:
        return self.serve(path, Reply(status=302, headers={"Location": location}, content_type="text/plain"))

    def requests_for(self, path: str) -> int:
        return self.seen.count(path)

    def next_reply(self, path: str) -> Reply | None:
        with self._lock:
            self.seen.append(path)
            queued = self._replies.get(path)
            if not queued:
                return None
            return queued.pop(0) if len(queued) > 1 else queued[0]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    origin: Origin
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        reply = self.origin.next_reply(self.path)
        if reply is None:
            reply = Reply(b"not found", 404, content_type="text/plain")
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            for part in self._parts(reply):
                self.wfile.write(part)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a killed worker): nothing left to send to

    def _parts(self, reply: Reply) -> Iterator[bytes]:
        if not reply.stall:
            yield reply.body
            return
        half = len(reply.body) // 2
        yield reply.body[:half]
        self.origin.stalled.set()
        self.origin.release.wait(60)
        yield reply.body[half:]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        pass
