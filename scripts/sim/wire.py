"""Replicate's wire formats: ids, timestamps, JSON bodies, errors and webhook signatures."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import random
import secrets
import string
from datetime import UTC, datetime

# Replicate's newer prediction ids are 26 characters of lowercase Crockford base32.
ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
# Webhook ids follow Svix's shape: msg_ + 27 base62 characters.
MSG_ALPHABET = string.ascii_letters + string.digits


class ApiError(Exception):
    """An HTTP error answered with Replicate's JSON problem body."""

    def __init__(self, status: int, detail: str, title: str | None = None, **extra: object) -> None:
        super().__init__(detail)
        self.status = status
        self.body: dict[str, object] = {"detail": detail, "status": status}
        if title:
            self.body = {"title": title, **self.body}
        self.body.update(extra)
        self.headers: dict[str, str] = {}


def not_found() -> ApiError:
    return ApiError(404, "The requested resource could not be found.")


def invalid_fields(fields: list[tuple[str, str, str]]) -> ApiError:
    """A 422 listing each (field, type, description) the way Replicate does."""
    detail = "".join(f"- {field}: {description}\n" for field, _, description in fields)
    described = [{"type": kind, "field": field, "description": description}
                 for field, kind, description in fields]
    return ApiError(422, detail, "Input validation failed", invalid_fields=described)


def new_prediction_id(rng: random.Random) -> str:
    return "".join(rng.choice(ID_ALPHABET) for _ in range(26))


def new_webhook_id(rng: random.Random) -> str:
    return "msg_" + "".join(rng.choice(MSG_ALPHABET) for _ in range(27))


def rfc3339(ns: int, digits: int = 9) -> str:
    """RFC 3339 in UTC with Go's trailing-zero trimming, e.g. 2024-08-27T04:11:26.610278754Z."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    digits_text = f"{fraction:09d}"[:digits].rstrip("0")
    return f"{stamp}.{digits_text}Z" if digits_text else f"{stamp}Z"


def dumps(value: object) -> str:
    """Compact JSON as Replicate's Go encoder writes it: UTF-8 kept, <, > and & escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # Those characters only occur inside JSON strings, so escaping them textually is safe.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def new_secret() -> str:
    """A signing secret shaped like Replicate's: whsec_ + base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a whsec_ secret; rejects secrets the official validators would refuse."""
    prefix, _, encoded = secret.partition("_")
    if prefix != "whsec" or not encoded or "_" in encoded:
        raise ValueError("webhook secret must look like whsec_<base64>")
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError("webhook secret must be whsec_ followed by standard base64") from None
    if not key:
        raise ValueError("webhook secret must not be empty")
    return key


def sign(secret: str, webhook_id: str, timestamp: int, body: str) -> str:
    """Standard Webhooks signature: v1,base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))."""
    signed = f"{webhook_id}.{timestamp}.{body}".encode()
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()
