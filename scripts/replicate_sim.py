"""A local Replicate: predictions, signed webhooks and fault switches, for development and tests.

It speaks the part of Replicate's HTTP API the service uses, under /v1:

  POST /v1/predictions                              {version, input, webhook, webhook_events_filter}
  POST /v1/models/{owner}/{name}/predictions        {input, webhook, webhook_events_filter}
  POST /v1/deployments/{owner}/{name}/predictions   {input, webhook, webhook_events_filter}
  GET  /v1/predictions/{id}    POST /v1/predictions/{id}/cancel    GET /v1/predictions
  GET  /v1/webhooks/default/secret                  -> {"key": "whsec_..."}

Every /v1 request needs "Authorization: Bearer <token>". Outputs are PNGs served at
/files/{id}/{n}.png. The simulator's own controls (no auth): GET /_sim/health,
GET|POST /_sim/faults, GET /_sim/webhooks.

Webhooks go to the prediction's webhook URL for the events in webhook_events_filter (default:
start, output, logs, completed), signed per Standard Webhooks with the secret. Only the
completed webhook is retried (non-2xx or no answer; same webhook-id, six attempts).

Timings are simulated seconds and --speed N runs them N times faster: 1 s starting, one tqdm
line per denoising step at ~4.9 it/s (num_inference_steps, default 50 for SDXL), 0.3 s per
output PNG. The 500 ms throttle on output/logs webhooks, the retry backoff (2, 4, 8, 16, 32 s)
and Cancel-After deadlines scale too, so a receiver sees the same webhooks in the same order
at any speed, only sooner. Rate-limit windows, Prefer: wait and HTTP timeouts stay wall-clock.

A prompt containing the word "fail" makes the prediction fail. Faults (--faults or POST
/_sim/faults): duplicate (each webhook 2-3 times, same id), reorder (intermediate webhooks
delayed; start sent after completed), drop (--drop-rate of webhooks never sent), fail
(--fail-rate of predictions fail), ratelimit (429 beyond --rate-limit creations per window).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.sim.engine import Timing  # noqa: E402
from scripts.sim.faults import FAULT_NAMES, Faults  # noqa: E402
from scripts.sim.simulator import Simulator  # noqa: E402

__all__ = ["Faults", "Simulator", "Timing", "start_simulator", "main"]


def start_simulator(host: str = "127.0.0.1", port: int = 0, *, secret: str | None = None,
                    speed: float = 1.0, faults: object = None, **options: object) -> Simulator:
    """Start a simulator on a background thread; port 0 picks a free port (see .url)."""
    return Simulator(host, port, secret=secret, speed=speed, faults=faults, **options).start()  # type: ignore[arg-type]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100, help="0 picks a free port (default 8100)")
    parser.add_argument("--speed", type=float, default=1.0, help="time compression: 10 = ten times faster")
    parser.add_argument("--faults", default="", help=f"comma-separated: {','.join(FAULT_NAMES)}")
    parser.add_argument("--seed", type=int, help="repeatable ids and fault choices")
    parser.add_argument("--secret", default=os.environ.get("REPLICATE_WEBHOOK_SECRET") or None,
                        help="webhook signing secret whsec_... (default: $REPLICATE_WEBHOOK_SECRET, "
                             "else a new one)")
    parser.add_argument("--token", help="the only API token accepted (default: any non-empty one)")
    parser.add_argument("--drop-rate", type=float, default=0.3, help="share of webhooks dropped")
    parser.add_argument("--fail-rate", type=float, default=0.3, help="share of predictions failed")
    parser.add_argument("--rate-limit", type=int, default=3,
                        help="creations allowed per --rate-window while ratelimit is on")
    parser.add_argument("--rate-window", type=float, default=1.0, help="seconds (wall clock)")
    parser.add_argument("--rate-limit-per-minute", type=int, default=600,
                        help="creation limit always enforced (Replicate's: 600)")
    parser.add_argument("--model", action="append", default=[], metavar="OWNER/NAME",
                        help="accept this model at /v1/models/OWNER/NAME/predictions too")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        faults = Faults.parse(args.faults, Faults(
            seed=args.seed, drop_rate=args.drop_rate, fail_rate=args.fail_rate, rate_limit=args.rate_limit,
            rate_window=args.rate_window, rate_limit_per_minute=args.rate_limit_per_minute))
        sim = start_simulator(args.host, args.port, secret=args.secret, speed=args.speed, faults=faults,
                              seed=args.seed, token=args.token, models=tuple(args.model))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"Replicate simulator: {sim.api_url}  (secret: GET {sim.api_url}/webhooks/default/secret)",
          flush=True)
    while not stop.wait(0.5):
        pass
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
