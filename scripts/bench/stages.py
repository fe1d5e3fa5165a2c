"""Where a webhook's time goes, for scripts/bench/ingest.py: the service's per-stage timings
(rjs_webhook_stage_seconds in /metrics, and each webhook's log line, `stages_ms`), read for
the measured run only, beside what wrk saw from outside."""

from __future__ import annotations

import http.client
import json
import math
from dataclasses import dataclass, field

# the stages of service.metrics.WEBHOOK_STAGES a webhook's log line has (respond ends after it)
IN_HANDLER = ("queue", "dispatch", "verify", "group_wait", "database", "wake")


def scrape(port: int) -> dict[str, float]:
    """Every sample of the service's /metrics, by its name and labels as written there."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def delta(before: dict[str, float], after: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix)}


def group_sizes(during: dict[str, float]) -> str | None:
    """How many webhooks each commit recorded (rjs_webhook_group_size, over the run)."""
    count = during.get("rjs_webhook_group_size_count")
    if not count:
        return None
    alone = during.get('rjs_webhook_group_size_bucket{le="1.0"}', 0)
    return (f"{during['rjs_webhook_group_size_sum'] / count:.2f} webhooks per commit on average "
            f"over {count:,.0f} commits; {alone / count:.0%} of the commits held one webhook")


@dataclass
class Breakdown:
    """Per-request stage times (ms) from the log lines of the measured run, and the
    respond stage's mean from /metrics (it ends after the log line is written)."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    totals: list[float] = field(default_factory=list)
    respond_mean_ms: float | None = None
    respond_over_5ms: float | None = None
    restarts: int = 0

    @classmethod
    def read(cls, log_lines: list[str], during: dict[str, float]) -> Breakdown:
        found = cls(samples={stage: [] for stage in IN_HANDLER})
        for line in log_lines:
            if "Booting worker" in line:
                found.restarts += 1
            if '"stages_ms"' not in line:
                continue
            stages = json.loads(line)["stages_ms"]
            for stage in IN_HANDLER:
                found.samples[stage].append(stages.get(stage, 0.0))
            found.totals.append(sum(stages.get(stage, 0.0) for stage in IN_HANDLER))
        key = 'rjs_webhook_stage_seconds_{}{{stage="respond"}}'
        count = during.get(key.format("count"))
        if count:
            found.respond_mean_ms = during[key.format("sum")] / count * 1000
            found.respond_over_5ms = 1 - during.get(
                'rjs_webhook_stage_seconds_bucket{le="0.005",stage="respond"}', 0) / count
        return found

    def print(self, wrk_p50: float, wrk_p99: float) -> None:
        if not self.totals:
            print("  (no stage timings: the log lines are off, --quiet-logs)")
            return
        slow = sorted(range(len(self.totals)), key=self.totals.__getitem__)
        tail = slow[-max(1, len(slow) // 100):]
        print(f"  {'stage (ms)':<12}{'mean':>8}{'p50':>8}{'p99':>8}{'max':>8}"
              f"{'in the slowest 1%':>20}")
        for stage in IN_HANDLER:
            values = self.samples[stage]
            ordered = sorted(values)
            print(f"  {stage:<12}{sum(values) / len(values):>8.2f}{percentile(ordered, 50):>8.2f}"
                  f"{percentile(ordered, 99):>8.2f}{ordered[-1]:>8.1f}"
                  f"{sum(values[i] for i in tail) / len(tail):>20.2f}")
        ordered = sorted(self.totals)
        print(f"  {'in server':<12}{sum(ordered) / len(ordered):>8.2f}{percentile(ordered, 50):>8.2f}"
              f"{percentile(ordered, 99):>8.2f}{ordered[-1]:>8.1f}"
              f"{sum(self.totals[i] for i in tail) / len(tail):>20.2f}")
        if self.respond_mean_ms is not None:
            print(f"  respond (log line, metrics, the answer written): mean {self.respond_mean_ms:.2f} ms, "
                  f"{self.respond_over_5ms:.1%} over 5 ms (from /metrics)")
        print(f"  wrk saw p50 {wrk_p50:.1f} ms, p99 {wrk_p99:.1f} ms: the rest is the kernel, "
              "gunicorn's main loop handing the connection over (it needs the GIL too), and respond")
        print(f"  gunicorn workers started during the run (max_requests recycling): {self.restarts}")


def percentile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, math.ceil(len(ordered) * p / 100) - 1))]

