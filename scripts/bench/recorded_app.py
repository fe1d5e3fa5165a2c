"""The second baseline for scripts/bench/ingest.py: the least an endpoint that keeps the
webhook contract must do, and nothing more. It verifies the Standard Webhooks signature
over the raw body, parses the JSON, and records the delivery durably and idempotently: one
INSERT … ON CONFLICT (event_key) DO NOTHING, committed, into `recorded_events`, a copy of
the events table (its keys, indexes and checks) that ingest.py makes. No fold, no logging,
no metrics, no validation beyond the parse. A service that commits each webhook on its
own cannot beat this, so this/bare bounds its ratio; one that commits webhooks arriving
together as one group (ours: append_webhooks in sql/store.sql) shares the commit and can.
Run under the project's gunicorn config:

    DATABASE_URL=… REPLICATE_WEBHOOK_SECRET=whsec_… \\
        gunicorn -c gunicorn.conf.py --pythonpath scripts/bench recorded_app:app
"""

import json
import os
import threading

from flask import Flask, request
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from standardwebhooks.webhooks import Webhook

INSERT = """
    INSERT INTO recorded_events (event_key, stream, type, data, metadata)
    VALUES (%s, %s, 'replicate.webhook', %s, %s)
    ON CONFLICT (event_key) DO NOTHING
    RETURNING position"""

HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")

app = Flask(__name__)
verifier = Webhook(os.environ["REPLICATE_WEBHOOK_SECRET"])
_pool: ConnectionPool | None = None
_pool_lock = threading.Lock()


def pool() -> ConnectionPool:
    """One pool per gunicorn worker, made on its first request (after the fork)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ConnectionPool(os.environ["DATABASE_URL"], min_size=1, max_size=8,
                                   kwargs={"autocommit": True, "prepare_threshold": None})
        return _pool


@app.post("/webhooks/replicate")
def replicate() -> tuple[dict, int]:
    raw = request.get_data()
    headers = {k: request.headers.get(k, "") for k in HEADERS}
    verifier.verify(raw, headers)
    body = json.loads(raw)
    with pool().connection() as conn:
        row = conn.execute(INSERT, (headers["webhook-id"], body["id"], Jsonb(body),
                                    Jsonb({"source": "replicate"}))).fetchone()
    if row is None:
        return {"status": "duplicate"}, 200
    return {"status": "recorded", "position": row[0]}, 200
