"""Where processed outputs go: Supabase Storage when configured, else a local directory.

Both overwrite on a second put of the same path, so a retried task stores the same object
again instead of failing or duplicating it. Object paths are `jobs/<job>/<prediction>-<index>.<ext>`
(processed) and `jobs/<job>/<prediction>-<index>.original.<ext>` (as downloaded); see object_path.

Supabase is reached with requests over Storage's documented HTTP API rather than supabase-py:
one call (POST /storage/v1/object/<bucket>/<path> with x-upsert) did not justify the eighteen
packages supabase==2.34.1 brings (auth, realtime, websockets, cryptography, h2, ...), and
requests is already pinned and tested against local servers here.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import requests

from service.config import ROOT
from service.errors import ConfigError, ServiceError

logger = logging.getLogger(__name__)

DEFAULT_BUCKET = "outputs"
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # no leading dot: no "..", no hidden files
_ID = re.compile(r"[A-Za-z0-9_-]+")
_CONTENT_TYPE = re.compile(r"[a-z0-9.+-]+/[a-z0-9.+-]+", re.IGNORECASE)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR}
MAX_PATH = 512


class StorageError(ServiceError):
    """The output could not be stored."""

    code = "storage_error"
    status = 502
    transient = False

    def __init__(self, message: str | None = None, *, storage_status: int | None = None) -> None:
        self.storage_status = storage_status  # the status Storage reported, when it answered
        super().__init__(message)


class InvalidObjectPath(StorageError):
    """The object path is not a safe relative path."""

    code = "invalid_object_path"
    status = 400


class StorageRejected(StorageError):
    """Storage refused the upload."""

    code = "storage_rejected"


class StorageUnavailable(StorageError):
    """Storage is unavailable; the upload may succeed later."""

    code = "storage_unavailable"
    status = 503
    transient = True


@dataclass(frozen=True)
class StoredFile:
    url: str    # where a browser can get it
    path: str   # the object path within the storage
    bytes: int


class Storage(Protocol):
    def put(self, path: str, data: bytes, content_type: str) -> StoredFile: ...


def object_path(job: str, prediction: str, index: int, ext: str, original: bool = False) -> str:
    """jobs/<job>/<prediction>-<index>[.original].<ext>"""
    ext = ext.lower().removeprefix(".")
    if not (_ID.fullmatch(job) and _ID.fullmatch(prediction) and ext.isalnum() and ext.isascii()):
        raise InvalidObjectPath(f"cannot make an object path from {job!r}, {prediction!r}, {ext!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InvalidObjectPath(f"the output index must be a whole number >= 0, got {index!r}")
    return f"jobs/{job}/{prediction}-{index}{'.original' if original else ''}.{ext}"


def check_path(path: str) -> str:
    """path itself when it is relative, free of '..' and of odd characters; else InvalidObjectPath."""
    segments = path.split("/")
    if not path or len(path) > MAX_PATH or not all(_SEGMENT.fullmatch(s) for s in segments):
        raise InvalidObjectPath(f"unsafe object path {path[:80]!r}")
    return path


def storage_dir(config: Mapping[str, Any]) -> Path:
    """STORAGE_DIR, else DATA_DIR/files; a relative path is taken from the checkout's root."""
    raw = str(config.get("STORAGE_DIR") or "").strip()
    if not raw:
        return Path(str(config.get("DATA_DIR") or "").strip() or ROOT / ".data") / "files"
    path = Path(raw)
    return path if path.is_absolute() else ROOT / path


class LocalStorage:
    """Files under root_dir, written atomically, served by service.files at /files/<path>."""

    def __init__(self, root_dir: str | Path, public_base: str = "") -> None:
        self.root = Path(root_dir).resolve()
        self.public_base = public_base.rstrip("/")

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def put(self, path: str, data: bytes, content_type: str) -> StoredFile:
        target = self.root / check_path(path)
        _check_content_type(content_type)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(target, data)
        except OSError as exc:
            error = StorageError if exc.errno in _PERMANENT_ERRNOS else StorageUnavailable
            raise error(f"could not write {path}: {exc.strerror or exc}") from exc
        logger.info("output stored", extra={"action": "store", "storage": "local", "path": path,
                                            "bytes": len(data)})
        return StoredFile(f"{self.public_base}/files/{quote(path)}", path, len(data))


def _write_atomically(target: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one; a failure leaves no temp file."""
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes it 0600; the web process may run as another user
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    # The rename must survive a crash too: an event will say the file exists.
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SupabaseStorage:
    """Objects in a Supabase Storage bucket, uploaded with upsert; put returns the public URL,
    so the bucket is expected to be public (ensure_bucket creates it so)."""

    def __init__(self, url: str, service_role_key: str, bucket: str = DEFAULT_BUCKET, *,
                 timeout: tuple[float, float] = (5.0, 60.0), cache_control: str = "max-age=3600") -> None:
        if not url.startswith(("http://", "https://")) or not service_role_key:
            raise ConfigError("SUPABASE_URL must be an http(s) URL and SUPABASE_SERVICE_ROLE_KEY set")
        if not _BUCKET.fullmatch(bucket):
            raise ConfigError(f"STORAGE_BUCKET must be a lowercase bucket name, got {bucket!r}")
        self.base = url.rstrip("/") + "/storage/v1"
        self.bucket, self.timeout, self.cache_control = bucket, timeout, cache_control
        self._key = service_role_key

    def __repr__(self) -> str:
        return f"SupabaseStorage({self.base!r}, bucket={self.bucket!r})"

    def put(self, path: str, data: bytes, content_type: str) -> StoredFile:
        check_path(path)
        headers = self._headers() | {"Content-Type": _check_content_type(content_type),
                                     "cache-control": self.cache_control, "x-upsert": "true"}
        self._call("POST", f"/object/{self.bucket}/{quote(path)}", "upload", data=data, headers=headers)
        logger.info("output stored", extra={"action": "store", "storage": "supabase", "bucket": self.bucket,
                                            "path": path, "bytes": len(data)})
        return StoredFile(self.public_url(path), path, len(data))

    def public_url(self, path: str) -> str:
        return f"{self.base}/object/public/{self.bucket}/{quote(path)}"

    def ensure_bucket(self, public: bool = True) -> bool:
        """Create the bucket; False when it already existed."""
        body = {"id": self.bucket, "name": self.bucket, "public": public}
        try:
            self._call("POST", "/bucket", "bucket creation", json=body, headers=self._headers())
        except StorageRejected as exc:
            if exc.storage_status == 409 or "already exists" in str(exc).lower():
                return False
            raise
        logger.info("bucket created", extra={"action": "bucket_create", "bucket": self.bucket})
        return True

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}", "apikey": self._key}

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        try:
            response = requests.request(method, self.base + path, timeout=self.timeout,
                                        allow_redirects=False, **kwargs)
        except requests.RequestException as exc:
            # requests' messages carry nothing secret, but name only the kind of failure anyway
            raise StorageUnavailable(f"Supabase Storage {what} failed ({type(exc).__name__})") from None
        if response.status_code < 300:
            return response
        raise self._error(response, what)

    def _error(self, response: requests.Response, what: str) -> StorageError:
        status, detail = response.status_code, self._redact(_detail(response))
        # Storage reports some failures as 400 with the real status in the body ("statusCode": "409").
        reported = _reported_status(response) or status
        transient = any(s >= 500 or s in (408, 429) for s in (status, reported))
        error = StorageUnavailable if transient else StorageRejected
        message = f"Supabase Storage refused the {what} (HTTP {status}){': ' + detail if detail else ''}"
        return error(message, storage_status=reported)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***")


def _detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or "")[:200]
    return ""


def _reported_status(response: requests.Response) -> int | None:
    try:
        value = response.json().get("statusCode")
        return int(value) if value is not None else None
    except (ValueError, AttributeError, TypeError):
        return None


def _check_content_type(content_type: str) -> str:
    if not _CONTENT_TYPE.fullmatch(content_type or ""):
        raise StorageError(f"content type {content_type!r} is not a type/subtype")
    return content_type


def storage_from_config(config: Mapping[str, Any]) -> Storage:
    """Supabase when SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY are set, else a local directory."""
    url = str(config.get("SUPABASE_URL") or "").strip()
    key = str(config.get("SUPABASE_SERVICE_ROLE_KEY") or "").strip()
    if key and not url:
        raise ConfigError("SUPABASE_SERVICE_ROLE_KEY is set but SUPABASE_URL is not")
    if url and key:
        bucket = str(config.get("STORAGE_BUCKET") or "").strip() or DEFAULT_BUCKET
        return SupabaseStorage(url, key, bucket)
    public_base = str(config.get("PUBLIC_BASE_URL") or "").strip()
    return LocalStorage(storage_dir(config), public_base)
