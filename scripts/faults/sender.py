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
    """Each of `connections` threads owns one connection and takes the next unsent request."""
    sender = _Sender(requests, port, timeout)
    threads = [threading.Thread(target=sender.work, daemon=True) for _ in range(connections)]
    started, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Sent(time.perf_counter() - started, sender.answers, sender.latencies, sender.reconnects,
                time.process_time() - cpu)


class _Sender:
    """A request whose connection broke before any answer came is sent again on a new
    connection (the webhook endpoint is idempotent by webhook-id); counted in reconnects."""

    def __init__(self, requests: list[bytes], port: int, timeout: float) -> None:
        self.requests, self.port, self.timeout = requests, port, timeout
        self.answers: list[tuple[int, bytes]] = [(0, b"")] * len(requests)
        self.latencies: list[float] = []
        self.reconnects = 0
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            if self._next >= len(self.requests):
                return None
            self._next += 1
            return self._next - 1

    def work(self) -> None:
        sock = None
        while (i := self.take()) is not None:
            for _attempt in range(3):
                sock = sock or socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
                try:
                    sock = self._one(sock, i)
                    break
                except (OSError, http.client.HTTPException):
                    sock.close()
                    sock = None
                    with self._lock:
                        self.reconnects += 1
        if sock:
            sock.close()

    def _one(self, sock: socket.socket, i: int) -> socket.socket | None:
        """Send request i and keep its answer; the socket if it stays open, else None."""
        started = time.perf_counter()
        sock.sendall(self.requests[i])
        response = http.client.HTTPResponse(sock)
        response.begin()
        self.answers[i] = (response.status, response.read())
        with self._lock:
            self.latencies.append((time.perf_counter() - started) * 1000)
        if response.will_close:
            sock.close()
            return None
        return sock
