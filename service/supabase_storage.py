"""Outputs in a Supabase Storage bucket, through supabase-py (storage3).

Uploads upsert, so a retried task stores the same object again. What URL a stored output
gets depends on the bucket:

- public (STORAGE_PUBLIC=true, or the bucket says so): its permanent public URL;
- private (STORAGE_PUBLIC=false, or the bucket says so): the object's `authenticated` URL is
  recorded (it names the object for good; it needs a key to fetch), and the API and the
  dashboard show a signed URL for it instead, valid STORAGE_SIGNED_URL_SECONDS, made when a
  page asks and reused until half its life is gone. An event never holds a URL that expires.

Errors name the setting to check, never the key: Storage's answer is redacted before it
reaches a message or a log.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote

import httpx
from storage3.exceptions import StorageApiError
from supabase import Client, ClientOptions, create_client

from service.errors import ConfigError
from service.storage import (
    DEFAULT_BUCKET,
    StorageError,
    StorageRejected,
    StorageUnavailable,
    StoredFile,
    _check_content_type,
    check_path,
)

logger = logging.getLogger(__name__)

_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
DEFAULT_SIGNED_URL_SECONDS = 3600


class SupabaseStorage:
    """A bucket of a Supabase project, reached with the service role key."""

    def __init__(self, url: str, service_role_key: str, bucket: str = DEFAULT_BUCKET, *,
                 public: bool | None = None, signed_url_seconds: int = DEFAULT_SIGNED_URL_SECONDS,
                 timeout: float = 60.0, cache_seconds: int = 3600) -> None:
        if not url.startswith(("http://", "https://")) or not service_role_key:
            raise ConfigError("SUPABASE_URL must be an http(s) URL and SUPABASE_SERVICE_ROLE_KEY set")
        if not _BUCKET.fullmatch(bucket):
            raise ConfigError(f"STORAGE_BUCKET must be a lowercase bucket name, got {bucket!r}")
        self.base = url.rstrip("/") + "/storage/v1"
        self.bucket, self.signed_url_seconds, self.cache_seconds = bucket, signed_url_seconds, cache_seconds
        self._public = public  # None: ask the bucket, once
        self._key = service_role_key
        # our own httpx client: a short connect timeout, and no redirects followed with the key
        http = httpx.Client(timeout=httpx.Timeout(timeout, connect=5.0), follow_redirects=False)
        self._client: Client = create_client(url.rstrip("/"), service_role_key, ClientOptions(
            httpx_client=http, auto_refresh_token=False, persist_session=False))
        self._signed: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SupabaseStorage({self.base!r}, bucket={self.bucket!r})"

    @property
    def public(self) -> bool:
        """Whether the bucket is public: STORAGE_PUBLIC when set, else what the bucket says."""
        if self._public is None:
            bucket = self._call("bucket lookup", lambda s: s.get_bucket(self.bucket))
            self._public = bool(bucket.public)
        return self._public

    def put(self, path: str, data: bytes, content_type: str) -> StoredFile:
        check_path(path)
        options = {"content-type": _check_content_type(content_type), "upsert": "true",
                   "cache-control": str(self.cache_seconds)}
        self._call("upload", lambda s: s.from_(self.bucket).upload(path, data, options))
        logger.info("output stored", extra={"action": "store", "storage": "supabase", "bucket": self.bucket,
                                            "path": path, "bytes": len(data)})
        url = self.public_url(path) if self.public else self.object_url(path)
        return StoredFile(url, path, len(data))

    def public_url(self, path: str) -> str:
        return f"{self.base}/object/public/{self.bucket}/{quote(path)}"

    def object_url(self, path: str) -> str:
        """The private object's own URL (GET with a key); shown signed, see shown_urls."""
        return f"{self.base}/object/authenticated/{self.bucket}/{quote(path)}"

    def shown_urls(self, urls: Iterable[str | None]) -> dict[str, str]:
        """A signed URL for each of urls that is a private object of this bucket; others are left out."""
        prefix = self.object_url("")
        wanted = {u: unquote(u[len(prefix):]) for u in urls if u and u.startswith(prefix)}
        now = time.monotonic()
        with self._lock:
            fresh = {u: s for u, (s, good_until) in self._signed.items() if u in wanted and good_until > now}
        missing = [u for u in wanted if u not in fresh]
        if missing:
            fresh |= self._sign(missing, [wanted[u] for u in missing], now)
        return fresh

    def _sign(self, urls: list[str], paths: list[str], now: float) -> dict[str, str]:
        answers = self._call("signed URL request", lambda s: s.from_(self.bucket).create_signed_urls(
            paths, self.signed_url_seconds))
        signed = {u: a["signedURL"] for u, a in zip(urls, answers, strict=True) if a.get("signedURL")}
        with self._lock:
            if len(self._signed) > 10_000:
                self._signed.clear()
            self._signed.update((u, (s, now + self.signed_url_seconds / 2)) for u, s in signed.items())
        return signed

    def ensure_bucket(self, public: bool = True) -> bool:
        """Create the bucket; False when it already existed."""
        try:
            self._call("bucket creation", lambda s: s.create_bucket(self.bucket, options={"public": public}))
        except StorageRejected as exc:
            if exc.storage_status == 409 or "already exists" in str(exc).lower():
                return False
            raise
        logger.info("bucket created", extra={"action": "bucket_create", "bucket": self.bucket})
        return True

    def _call(self, what: str, request: Any) -> Any:
        try:
            return request(self._client.storage)
        except StorageApiError as exc:
            raise self._error(exc, what) from None
        except httpx.HTTPError as exc:
            # name only the kind of failure: a transport message could quote a URL or header
            raise StorageUnavailable(f"Supabase Storage {what} failed ({type(exc).__name__}); "
                                     "check SUPABASE_URL and that Storage is reachable") from None

    def _error(self, exc: StorageApiError, what: str) -> StorageError:
        cause = exc.__cause__
        status = cause.response.status_code if isinstance(cause, httpx.HTTPStatusError) else None
        # Storage reports some failures as 400 with the real status in the body ("statusCode": "409").
        reported = _int(exc.status) or status
        transient = any(s is not None and (s >= 500 or s in (408, 429)) for s in (status, reported))
        detail = self._redact(str(exc.message or exc.code or ""))[:200]
        message = f"Supabase Storage refused the {what} (HTTP {status or reported})"
        message += f": {detail}" if detail else ""
        message += _hint(reported, detail, self.bucket)
        error = StorageUnavailable if transient else StorageRejected
        return error(message, storage_status=reported)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***")


def _hint(status: int | None, detail: str, bucket: str) -> str:
    if status in (401, 403) or "jwt" in detail.lower() or "signature" in detail.lower():
        return "; check SUPABASE_SERVICE_ROLE_KEY (the project's service role key)"
    if status == 404 and "bucket" in detail.lower():
        return f"; check STORAGE_BUCKET ({bucket!r} does not exist in this project)"
    return ""


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None
