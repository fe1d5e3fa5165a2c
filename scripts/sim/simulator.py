"""The simulator as a whole: a threaded HTTP server wired to the engine and the deliveries."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .api import Api, Response, json_response
from .catalog import Catalog
from .delivery import Attempt, Deliveries
from .engine import Engine, Timing
from .faults import Faults
from .scheduler import Scheduler
from .wire import new_secret, secret_key

logger = logging.getLogger(__name__)


class Handler(BaseHTTPRequestHandler):
    """Moves bytes between the socket and Api.handle, and logs every request."""

    protocol_version = "HTTP/1.1"
    server_version = "replicate-sim/1.0"
    timeout = 30  # idle keep-alive connections go away

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _serve(self) -> None:
        started = time.monotonic()
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length > 0 else b""
            response = self.server.api.handle(self.command, self.path, self.headers, body)  # type: ignore[attr-defined]
        except Exception:
            logger.exception("request failed", extra={"action": "sim_request"})
            response = json_response(500, {"detail": "Internal server error.", "status": 500})
        self._write(response)
        logger.info("%s %s %d %.1fms", self.command, self.path, response.status,
                    (time.monotonic() - started) * 1000, extra={"action": "sim_request"})

    def _write(self, response: Response) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: Api


class Simulator:
    """A running local Replicate. Build it with start_simulator(); stop() shuts it all down."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, secret: str | None = None,
                 token: str | None = None, speed: float = 1.0, faults: object = None,
                 seed: int | None = None, timing: Timing | None = None, models: tuple[str, ...] = (),
                 deployments: Mapping[str, str] | None = None, webhook_timeout: float = 5.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be greater than 0")
        self.secret = secret or new_secret()
        secret_key(self.secret)  # fail now, not at the first webhook
        self.speed = speed
        self._faults = Faults.parse(faults, Faults(seed=seed))
        if seed is not None:  # an explicit seed wins over one inside `faults`
            self._faults = replace(self._faults, seed=seed)
        self._faults_lock = threading.Lock()
        self._scheduler = Scheduler()
        self._deliveries = Deliveries(self.secret, speed, self.faults, self._scheduler, webhook_timeout)
        self._server = _Server((host, port), Handler)
        bound_host, self.port = self._server.server_address[:2]
        self.url = f"http://{'127.0.0.1' if bound_host in ('0.0.0.0', '') else bound_host}:{self.port}"
        self._engine = Engine(self.url, speed, self.faults, self._scheduler, self._deliveries,
                              self._faults.seed, timing or Timing())
        self._server.api = Api(self._engine, self._deliveries, Catalog(models, deployments), self.secret,
                               token, self.faults, self.set_faults)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="sim-http",
                                        daemon=True)
        self._stopped = False

    @property
    def api_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> Simulator:
        self._thread.start()
        logger.info("Replicate simulator listening on %s (speed %g, faults %s)", self.api_url,
                    self.speed, ",".join(sorted(self.faults().enabled)) or "none",
                    extra={"action": "sim_start"})
        return self

    def faults(self) -> Faults:
        with self._faults_lock:
            return self._faults

    def set_faults(self, spec: object) -> Faults:
        """Replace the faults: names ('drop,reorder' or a list) or a dict of names and knobs."""
        with self._faults_lock:
            self._faults = Faults.parse(spec, self._faults)
            faults = self._faults
        logger.info("faults now %s", ",".join(sorted(faults.enabled)) or "none",
                    extra={"action": "sim_faults"})
        return faults

    @property
    def predictions(self) -> dict[str, dict]:
        """A copy of every prediction object, by id."""
        return self._engine.all()

    @property
    def cancel_after(self) -> dict[str, str]:
        """The Cancel-After header each prediction was created with, by id (as sent)."""
        return dict(self._server.api.cancel_after)

    @property
    def webhook_log(self) -> list[Attempt]:
        """Every delivery attempt so far (and every webhook the drop fault ate), in order."""
        return self._deliveries.log

    def wait(self, prediction_id: str, timeout: float = 10.0) -> dict | None:
        """The prediction once it is terminal, or as it is after timeout wall seconds."""
        return self._engine.wait(prediction_id, timeout)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._scheduler.stop()
        self._deliveries.close()
        logger.info("Replicate simulator stopped", extra={"action": "sim_stop"})

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
