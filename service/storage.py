"""Where processed outputs go: Supabase Storage when configured, else a local directory.

Both overwrite on a second put of the same path, so a retried task stores the same object
again instead of failing or duplicating it. Object paths are `jobs/<job>/<prediction>-<index>.<ext>`
(processed) and `jobs/<job>/<prediction>-<index>.original.<ext>` (as downloaded); see object_path.

Supabase Storage is reached through supabase-py (service/supabase_storage.py), imported only
when it is configured: public buckets give public URLs, private ones signed URLs made when the
API or the dashboard shows an output (shown_urls).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from service.config import ROOT
from service.errors import ConfigError, ServiceError

logger = logging.getLogger(__name__)

DEFAULT_BUCKET = "outputs"
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # no leading dot: no "..", no hidden files
_ID = re.compile(r"[A-Za-z0-9_-]+")
_CONTENT_TYPE = re.compile(r"[a-z0-9.+-]+/[a-z0-9.+-]+", re.IGNORECASE)
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

    def shown_urls(self, urls: Iterable[str | None]) -> dict[str, str]:
        """What to show instead of some stored URLs (signed ones, for a private bucket)."""
        ...


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

    def shown_urls(self, urls: Iterable[str | None]) -> dict[str, str]:
        return {}  # /files URLs never expire


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


def _check_content_type(content_type: str) -> str:
    if not _CONTENT_TYPE.fullmatch(content_type or ""):
        raise StorageError(f"content type {content_type!r} is not a type/subtype")
    return content_type


def show_urls(storage: Storage | None, items: list[dict[str, Any]],
              fields: tuple[str, ...] = ("url",)) -> None:
    """Replace the stored URLs in items (outputs) by what the storage shows for them: signed URLs
    of a private bucket. When signing fails the stored URL stays and a warning is logged: the
    page still answers."""
    urls = [item.get(f) for item in items for f in fields]
    if storage is None or not any(urls):
        return
    try:
        shown = storage.shown_urls(urls)
    except StorageError as exc:
        logger.warning("could not sign output URLs: %s", exc, extra={"action": "sign_urls"})
        return
    for item in items:
        for f in fields:
            item[f] = shown.get(item.get(f), item.get(f))


def storage_from_config(config: Mapping[str, Any]) -> Storage:
    """Supabase when SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY are set, else a local directory."""
    url = str(config.get("SUPABASE_URL") or "").strip()
    key = str(config.get("SUPABASE_SERVICE_ROLE_KEY") or "").strip()
    if key and not url:
        raise ConfigError("SUPABASE_SERVICE_ROLE_KEY is set but SUPABASE_URL is not")
    if url and key:
        from service.supabase_storage import SupabaseStorage

        bucket = str(config.get("STORAGE_BUCKET") or "").strip() or DEFAULT_BUCKET
        return SupabaseStorage(url, key, bucket, public=_public(config),
                               signed_url_seconds=_signed_url_seconds(config))
    public_base = str(config.get("PUBLIC_BASE_URL") or "").strip()
    return LocalStorage(storage_dir(config), public_base)


def _public(config: Mapping[str, Any]) -> bool | None:
    """STORAGE_PUBLIC: true, false, or unset (ask the bucket)."""
    raw = str(config.get("STORAGE_PUBLIC") or "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"STORAGE_PUBLIC must be true, false or auto, got {raw!r}")
    return raw in ("true", "1", "yes")


def _signed_url_seconds(config: Mapping[str, Any]) -> int:
    raw = str(config.get("STORAGE_SIGNED_URL_SECONDS") or "").strip() or "3600"
    if not raw.isdigit() or not 60 <= int(raw) <= 31_536_000:
        raise ConfigError(f"STORAGE_SIGNED_URL_SECONDS must be a whole number of seconds from 60 "
                          f"to 31536000, got {raw!r}")
    return int(raw)
