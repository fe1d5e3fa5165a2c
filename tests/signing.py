"""Sign webhook bodies the way Replicate does (Standard Webhooks), for tests."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def signed(body: dict | bytes, secret: str = SECRET, webhook_id: str | None = None,
           timestamp: float | None = None) -> tuple[bytes, dict[str, str]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    webhook_id = webhook_id or f"msg_{uuid.uuid4().hex}"
    ts = int(time.time() if timestamp is None else timestamp)
    signature = Webhook(secret).sign(webhook_id, datetime.fromtimestamp(ts, tz=UTC), raw.decode())
    return raw, {"webhook-id": webhook_id, "webhook-timestamp": str(ts), "webhook-signature": signature,
                 "content-type": "application/json"}
