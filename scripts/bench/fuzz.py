"""Fuzz the public surfaces at volume: 100,000+ cases through the real app and database.

    .venv/bin/python scripts/bench/fuzz.py [--cases 100000] [--seed 7]

The case families of tests/test_fuzz.py (tests/fuzzing.py), each run with Hypothesis
(generation only, no shrinking, one seed for the run) through the Flask test client in
process, against a scratch database migrated by service.migrations:

  webhook signed body   any body (mutated real payloads, any JSON, hostile JSON, bytes),
                        correctly signed, with or without a ?job= of any shape
  webhook headers       real payloads whose signature headers are dropped or replaced
  POST /api/jobs        job-shaped JSON with fields replaced, or any JSON; any Idempotency-Key
  GET|POST /api/jobs/…  any job path, list filters, cursors and methods
  schemathesis          positive and negative cases from /api/openapi.json, every operation

Every answer is checked: no 5xx, every 4xx a JSON object with `error` and `message`,
and for webhooks the events table grows by exactly one for a `recorded` answer and by
none otherwise, and only for a delivery whose signature the test's own HMAC oracle
accepts. Prints the cases tried and the answers by endpoint, and every failure found
(the first few in full). Exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable

from common import ROOT, add_database_url, scratch_database, server

sys.path.insert(0, str(ROOT))

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from service import create_app, db, jobs  # noqa: E402
from tests.fuzzing import (  # noqa: E402
    Fuzzer,
    Outcome,
    header_mutations,
    idempotency_keys,
    job_paths,
    job_queries,
    job_requests,
    predictions,
    webhook_bodies,
)
from tests.signing import SECRET  # noqa: E402

SHARES = {"webhook signed body": 0.30, "webhook headers": 0.25, "POST /api/jobs": 0.20,
          "job reads": 0.10, "schemathesis": 0.15}


class Tally:
    def __init__(self) -> None:
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.failures: list[tuple[str, int, list[str], str]] = []

    def add(self, outcome: Outcome, case: str) -> None:
        self.statuses[outcome.endpoint][outcome.status] += 1
        if outcome.problems:
            self.failures.append((outcome.endpoint, outcome.status, outcome.problems, case[:300]))


def run(name: str, examples: int, run_seed: int, strategy: st.SearchStrategy, send: Callable) -> float:
    """Run `send` on `examples` cases drawn from `strategy`; seconds taken."""
    started = time.perf_counter()

    @seed(run_seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def family(case: object) -> None:
        send(case)

    family()
    print(f"  {name}: {examples} asked, {time.perf_counter() - started:.0f} s", flush=True)
    return time.perf_counter() - started


def schemathesis_sender(app, fuzzer: Fuzzer, tally: Tally) -> Callable:
    def send(case) -> None:
        before = fuzzer.events()
        response = case.call(app=app)
        outcome = Outcome(f"schemathesis {case.operation.label}", response.status_code)
        if response.status_code >= 500:
            outcome.problems.append(f"{response.status_code}: {response.content[:200]!r}")
        elif response.status_code >= 400:
            try:
                body = json.loads(response.content)
            except ValueError:
                body = None
            if not (isinstance(body, dict) and body.get("error") and body.get("message")):
                outcome.problems.append(f"{response.status_code} without a JSON error")
        if case.operation.path == "/webhooks/replicate" and fuzzer.events() != before:
            outcome.problems.append("an unsigned webhook was stored")
        tally.add(outcome, case.as_curl_command())
    return send


def families(app, fuzzer: Fuzzer, tally: Tally) -> dict[str, tuple[st.SearchStrategy, Callable]]:
    schema = schemathesis.openapi.from_dict(jobs.openapi_document())
    return {
        "webhook signed body": (
            st.tuples(webhook_bodies(), st.sampled_from(["", "?job=x&step=1", "?job=" + "0" * 32])),
            lambda c: tally.add(fuzzer.run_signed_body(*c), repr(c))),
        "webhook headers": (
            st.tuples(predictions().map(lambda p: json.dumps(p).encode()), header_mutations()),
            lambda c: tally.add(fuzzer.run_headers(*c), repr(c))),
        "POST /api/jobs": (st.tuples(job_requests(), idempotency_keys),
                           lambda c: tally.add(fuzzer.run_job_create(*c), repr(c))),
        "job reads": (st.tuples(job_paths, job_queries, st.sampled_from(["GET", "GET", "POST", "DELETE"])),
                      lambda c: tally.add(fuzzer.run_job_read(*c), repr(c))),
        "schemathesis": (st.one_of(schema.as_strategy(GenerationMode.POSITIVE),
                                   schema.as_strategy(GenerationMode.NEGATIVE)),
                         schemathesis_sender(app, fuzzer, tally)),
    }


def report(tally: Tally, seconds: float) -> int:
    total = sum(sum(c.values()) for c in tally.statuses.values())
    print(f"\ncases tried: {total:,} in {seconds:.0f} s ({total / seconds:,.0f}/s)")
    for endpoint, statuses in sorted(tally.statuses.items()):
        answers = ", ".join(f"{code}: {n:,}" for code, n in sorted(statuses.items()))
        print(f"  {endpoint:<45} {sum(statuses.values()):>7,}   {answers}")
    print(f"failures found: {len(tally.failures)}")
    for endpoint, status, problems, case in tally.failures[:10]:
        print(f"  {endpoint} -> {status}: {'; '.join(problems)}\n    case: {case}")
    return 1 if tally.failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="cases to run, over all families")
    parser.add_argument("--seed", type=int, default=7, help="Hypothesis seed (same seed, same cases)")
    add_database_url(parser)
    args = parser.parse_args()
    tally = Tally()
    with server(args.database_url) as (server_url, where), \
            scratch_database(server_url, f"rjs_bench_fuzz_{os.getpid()}") as url:
        print(f"fuzzing {args.cases:,} cases, seed {args.seed}, PostgreSQL: {where}", flush=True)
        app = create_app({"TESTING": True, "DATABASE_URL": url, "REPLICATE_WEBHOOK_SECRET": SECRET,
                          "LOG_LEVEL": "WARNING"})
        logging.getLogger("service").setLevel(logging.CRITICAL)  # 500s are counted, not printed
        with db.connect(url, autocommit=True) as conn:
            fuzzer = Fuzzer(app.test_client(), conn)
            seconds = sum(run(name, max(1, round(args.cases * SHARES[name])), args.seed, strategy, send)
                          for name, (strategy, send) in families(app, fuzzer, tally).items())
            print(f"events stored: {fuzzer.events():,}")
        app.extensions["db_pool"].close()
    return report(tally, seconds)


if __name__ == "__main__":
    sys.exit(main())
