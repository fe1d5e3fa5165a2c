"""Send pre-built raw HTTP/1.1 requests (scripts/bench/ingest.py signed_requests) to a loopback
server over N keep-alive connections, each request exactly once, as fast as the server answers."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Sent:
    seconds: float
    answers: list[tuple[int, bytes]]             # per request, in request order: (status, body)
    latencies_ms: list[float] = field(default_factory=list)
    reconnects: int = 0
    client_cpu_seconds: float = 0.0                # this process's CPU while sending

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else 0.0


def send_all(requests: list[bytes], port: int, connections: int, timeout: float = 30.0) -> Sent:
    """Each thread owns one connection and takes the next unsent request. A request whose
    connection broke before any answer came is sent again on a new connection (the webhook
    endpoint is idempotent by webhook-id); that is counted in reconnects."""
    answers: list[tuple[int, bytes]] = [(0, b"")] * len(requests)
    latencies: list[float] = []
    state = {"next": 0, "reconnects": 0}
    lock = threading.Lock()

    def take() -> int | None:
        with lock:
            i = state["next"]
            if i >= len(requests):
                return None
            state["next"] = i + 1
            return i

    def work() -> None:
        sock = None
        while (i := take()) is not None:
            for _attempt in range(3):
                sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
                started = time.perf_counter()
                try:
                    status, body, reusable = _exchange(sock, requests[i])
                except (OSError, http.client.HTTPException):
                    sock.close()
                    sock = None
                    with lock:
                        state["reconnects"] += 1
                    continue
                answers[i] = (status, body)
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000)
                if not reusable:
                    sock.close()
                    sock = None
                break
        if sock:
            sock.close()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(connections)]
    started, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Sent(time.perf_counter() - started, answers, latencies, state["reconnects"],
                time.process_time() - cpu)


def _exchange(sock: socket.socket, raw: bytes) -> tuple[int, bytes, bool]:
    """Send one request, read its answer: (status, body, whether the connection stays open)."""
    sock.sendall(raw)
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    return response.status, body, not response.will_close
