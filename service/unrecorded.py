"""Webhook deliveries answered without becoming events: refusals (bad signature, not a
prediction, too large) and duplicates of a recorded webhook-id. Counted for the
dashboard's health panel in unrecorded_webhooks; their bodies are never kept."""

from __future__ import annotations

import logging

from flask import current_app, request

from service.db import queries

logger = logging.getLogger(__name__)

# A refusal is answered whatever happens here, so the wait for a pooled connection is short.
POOL_WAIT_SECONDS = 1.0


def note(outcome: str, http_status: int, detail: str | None = None) -> None:
    """Record one unrecorded delivery of the current request, in a transaction of its own.
    Never raises: failing to count a refusal must not change the answer to Replicate."""
    values = {"outcome": outcome, "http_status": http_status,
              "webhook_id": _clip(request.headers.get("webhook-id"), 256),
              "remote_addr": _clip(request.remote_addr, 64), "detail": _clip(detail, 512)}
    try:
        with current_app.extensions["db_pool"].connection(timeout=POOL_WAIT_SECONDS) as conn:
            conn.execute(queries["record_unrecorded_webhook"], values)
    except Exception as exc:  # the pool, the network, the database: all only cost the count
        logger.warning("could not record an unrecorded webhook: %s", exc,
                       extra={"action": "webhook_unrecorded", "outcome": outcome})


def _clip(text: str | None, limit: int) -> str | None:
    return text[:limit] if text else None
