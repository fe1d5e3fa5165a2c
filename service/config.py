"""Settings, read once from the environment; every name is listed in .env.example."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from service.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _int(env: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


_PASSED_THROUGH = (
    "DOWNLOAD_MAX_BYTES", "DOWNLOAD_CONNECT_TIMEOUT", "DOWNLOAD_READ_TIMEOUT", "DOWNLOAD_TOTAL_TIMEOUT",
    "IMAGE_UPSCALE_FACTOR", "IMAGE_MAX_LONG_SIDE", "IMAGE_RESIZE_LONG_SIDE", "IMAGE_JPEG_QUALITY",
    "IMAGE_WEBP_QUALITY", "IMAGE_PNG_COMPRESSION", "IMAGE_MAX_PIXELS", "STORAGE_DIR",
    "STORAGE_PUBLIC", "STORAGE_SIGNED_URL_SECONDS", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_JWT_SECRET",
    "SUPABASE_ANON_KEY", "JOB_CANCEL_AFTER", "REPLICATE_PRICES",
)


def _url(env: dict[str, str], name: str, default: str | None) -> str | None:
    raw = env.get(name, "").strip().rstrip("/")
    if not raw:
        return default
    if not raw.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {raw!r}")
    return raw


def secret_problem(secret: str) -> str | None:
    """Why a Standard Webhooks signing secret is unusable, or None when it is fine."""
    if not secret.startswith("whsec_"):
        return "must look like whsec_… (Replicate's secret from GET /v1/webhooks/default/secret)"
    encoded = secret.removeprefix("whsec_").rstrip("=")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        return "must be base64 after whsec_"
    return None if key else "must not be empty after whsec_"


def _secret(env: dict[str, str]) -> str | None:
    raw = env.get("REPLICATE_WEBHOOK_SECRET", "").strip()
    problem = secret_problem(raw) if raw else None
    if problem:
        raise ConfigError(f"REPLICATE_WEBHOOK_SECRET {problem}")
    return raw or None


def _flag(env: dict[str, str], name: str) -> bool:
    """true/false (also 1/0, yes/no, on/off); unset or empty is false."""
    raw = env.get(name, "").strip().lower()
    if raw in ("", "false", "0", "no", "off"):
        return False
    if raw in ("true", "1", "yes", "on"):
        return True
    raise ConfigError(f"{name} must be true or false, got {env[name].strip()!r}")


def _metrics_token(env: dict[str, str]) -> str | None:
    """/metrics is outside the rate limit (Prometheus scrapes often, from one address), so its
    token must be too long to guess at any rate."""
    token = env.get("METRICS_TOKEN", "").strip()
    if token and len(token) < 16:
        raise ConfigError("METRICS_TOKEN is too short: use at least 16 characters (openssl rand -hex 32)")
    return token or None


def _addresses(env: dict[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """Comma-separated IP addresses; unset means the default, empty means none."""
    if name not in env:
        return default
    found = tuple(a.strip() for a in env[name].split(",") if a.strip())
    for address in found:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"{name} must list IP addresses, got {address!r}") from None
    return found


def default_log_format() -> str:
    """text for a person at a terminal, json for anything else (a platform, a pipe, a file)."""
    stderr = sys.stderr
    return "text" if stderr is not None and stderr.isatty() else "json"


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    DATABASE_URL: str | None = None
    DATA_DIR: str = field(default_factory=lambda: str(ROOT / ".data"))
    DB_POOL_MIN: int = 1
    DB_POOL_MAX: int = 10
    DB_STATEMENT_TIMEOUT_MS: int = 30_000
    LOG_LEVEL: str = "INFO"
    # json: one JSON object per line (for log pipelines); text: for people. Unset: text when
    # stderr is a terminal (a person is reading), else json (a platform's log pipeline).
    LOG_FORMAT: str = "json"
    # Public endpoints (webhooks, /api): token bucket per client address, 0 = off
    RATE_LIMIT_PER_MINUTE: int = 12_000
    RATE_LIMIT_BURST: int = 2_000
    RATE_LIMIT_EXEMPT: tuple[str, ...] = ("127.0.0.1", "::1")
    # Replicate
    REPLICATE_API_BASE_URL: str = "https://api.replicate.com/v1"
    REPLICATE_API_TOKEN: str | None = field(default=None, repr=False)
    REPLICATE_WEBHOOK_SECRET: str | None = field(default=None, repr=False)
    REPLICATE_RATE_LIMIT_PER_MINUTE: int = 600
    PUBLIC_BASE_URL: str | None = None
    WEBHOOK_MAX_BYTES: int = 1024 * 1024
    # Jobs API: comma-separated bearer keys; empty means no key is required
    API_KEYS: tuple[str, ...] = field(default=(), repr=False)
    # Where the web app listens (service/exposure.py): gunicorn.conf.py binds HOST:PORT and
    # hands the workers its final bind here. Off loopback, the service will not run open.
    HOST: str = "127.0.0.1"
    ALLOW_OPEN_API: bool = False
    # /metrics: a bearer token Prometheus sends; without one it answers only on loopback
    # unless ALLOW_OPEN_METRICS
    METRICS_TOKEN: str | None = field(default=None, repr=False)
    ALLOW_OPEN_METRICS: bool = False
    # Worker and reconciler
    RECONCILE_AFTER_SECONDS: int = 300
    RECONCILE_INTERVAL_SECONDS: int = 60
    # The delivery log (whole webhook bodies) is kept this many days; 0 = forever
    EVENTS_RAW_RETENTION_DAYS: int = 30
    # Who keeps events' partitions (applied by migrate): auto = pg_partman where the server
    # has it, else the built-in upkeep; partman = pg_partman, which must be there; builtin
    EVENT_PARTITIONS: str = "auto"
    WORKER_POLL_SECONDS: int = 5
    WORKER_LEASE_SECONDS: int = 300
    # Per job owner (sql/queue.sql, claim_task), 0 = off: predictions in flight, creates a minute
    OWNER_MAX_RUNNING: int = 0
    OWNER_RATE_LIMIT_PER_MINUTE: int = 0
    # Downloads, imaging and storage: kept as text here, parsed and range-checked at startup
    # by the module that uses them (downloads.DownloadPolicy, imaging.ImagingSettings,
    # storage.storage_from_config), so each rule lives in one place.
    OUTPUT_ALLOWED_HOSTS: str = ""
    DOWNLOAD_MAX_BYTES: str | None = None
    DOWNLOAD_CONNECT_TIMEOUT: str | None = None
    DOWNLOAD_READ_TIMEOUT: str | None = None
    DOWNLOAD_TOTAL_TIMEOUT: str | None = None
    IMAGE_UPSCALE_FACTOR: str | None = None
    IMAGE_MAX_LONG_SIDE: str | None = None
    IMAGE_RESIZE_LONG_SIDE: str | None = None
    IMAGE_JPEG_QUALITY: str | None = None
    IMAGE_WEBP_QUALITY: str | None = None
    IMAGE_PNG_COMPRESSION: str | None = None
    IMAGE_MAX_PIXELS: str | None = None
    STORAGE_DIR: str | None = None
    STORAGE_BUCKET: str = "outputs"
    STORAGE_PUBLIC: str | None = None               # true, false, or unset: ask the bucket
    STORAGE_SIGNED_URL_SECONDS: str | None = None   # lifetime of a private bucket's signed URLs
    SUPABASE_URL: str | None = None
    SUPABASE_SERVICE_ROLE_KEY: str | None = field(default=None, repr=False)
    # The project's anon (publishable) key: what `flask --app service follow` signs users in with
    SUPABASE_ANON_KEY: str | None = field(default=None, repr=False)
    # Supabase user access tokens for the jobs API (service/auth.py): the project's JWT
    # secret (HS256) and/or its JWKS URL (asymmetric signing keys)
    SUPABASE_JWT_SECRET: str | None = field(default=None, repr=False)
    SUPABASE_JWKS_URL: str | None = None
    # Jobs: a default deadline (seconds, or "90s", "5m"; unset: none), and the operator's
    # prices for cost estimates (service/costs.py); both checked at startup by create_app
    JOB_CANCEL_AFTER: str | None = None
    REPLICATE_PRICES: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        url = env.get("DATABASE_URL", "").strip() or None
        if url and not url.startswith(("postgres://", "postgresql://")):
            raise ConfigError("DATABASE_URL must start with postgresql:// (or postgres://)")
        level = env.get("LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        log_format = env.get("LOG_FORMAT", "").strip().lower() or default_log_format()
        if log_format not in {"json", "text"}:
            raise ConfigError(f"LOG_FORMAT must be json or text, got {log_format!r}")
        pool_max = _int(env, "DB_POOL_MAX", 10, 1, 200)
        event_partitions = env.get("EVENT_PARTITIONS", "").strip().lower() or "auto"
        if event_partitions not in {"auto", "partman", "builtin"}:
            raise ConfigError(f"EVENT_PARTITIONS must be auto, partman or builtin, got {event_partitions!r}")
        return cls(
            DATABASE_URL=url,
            DATA_DIR=env.get("DATA_DIR", "").strip() or str(ROOT / ".data"),
            DB_POOL_MIN=_int(env, "DB_POOL_MIN", 1, 0, pool_max),
            DB_POOL_MAX=pool_max,
            DB_STATEMENT_TIMEOUT_MS=_int(env, "DB_STATEMENT_TIMEOUT_MS", 30_000, 0, 3_600_000),
            LOG_LEVEL=level,
            LOG_FORMAT=log_format,
            RATE_LIMIT_PER_MINUTE=_int(env, "RATE_LIMIT_PER_MINUTE", 12_000, 0, 10_000_000),
            RATE_LIMIT_BURST=_int(env, "RATE_LIMIT_BURST", 2_000, 1, 10_000_000),
            RATE_LIMIT_EXEMPT=_addresses(env, "RATE_LIMIT_EXEMPT", ("127.0.0.1", "::1")),
            REPLICATE_API_BASE_URL=_url(env, "REPLICATE_API_BASE_URL", "https://api.replicate.com/v1"),
            REPLICATE_API_TOKEN=env.get("REPLICATE_API_TOKEN", "").strip() or None,
            REPLICATE_WEBHOOK_SECRET=_secret(env),
            REPLICATE_RATE_LIMIT_PER_MINUTE=_int(env, "REPLICATE_RATE_LIMIT_PER_MINUTE", 600, 1, 100_000),
            PUBLIC_BASE_URL=_url(env, "PUBLIC_BASE_URL", None),
            WEBHOOK_MAX_BYTES=_int(env, "WEBHOOK_MAX_BYTES", 1024 * 1024, 1024, 64 * 1024 * 1024),
            API_KEYS=tuple(k.strip() for k in env.get("API_KEYS", "").split(",") if k.strip()),
            HOST=env.get("HOST", "").strip() or "127.0.0.1",
            ALLOW_OPEN_API=_flag(env, "ALLOW_OPEN_API"),
            METRICS_TOKEN=_metrics_token(env),
            ALLOW_OPEN_METRICS=_flag(env, "ALLOW_OPEN_METRICS"),
            RECONCILE_AFTER_SECONDS=_int(env, "RECONCILE_AFTER_SECONDS", 300, 1, 24 * 3600),
            RECONCILE_INTERVAL_SECONDS=_int(env, "RECONCILE_INTERVAL_SECONDS", 60, 1, 24 * 3600),
            EVENTS_RAW_RETENTION_DAYS=_int(env, "EVENTS_RAW_RETENTION_DAYS", 30, 0, 100 * 365),
            EVENT_PARTITIONS=event_partitions,
            WORKER_POLL_SECONDS=_int(env, "WORKER_POLL_SECONDS", 5, 1, 300),
            WORKER_LEASE_SECONDS=_int(env, "WORKER_LEASE_SECONDS", 300, 3, 24 * 3600),
            OWNER_MAX_RUNNING=_int(env, "OWNER_MAX_RUNNING", 0, 0, 100_000),
            OWNER_RATE_LIMIT_PER_MINUTE=_int(env, "OWNER_RATE_LIMIT_PER_MINUTE", 0, 0, 100_000),
            **{name: env.get(name, "").strip() or None for name in _PASSED_THROUGH},
            OUTPUT_ALLOWED_HOSTS=env.get("OUTPUT_ALLOWED_HOSTS", "").strip(),
            STORAGE_BUCKET=env.get("STORAGE_BUCKET", "").strip() or "outputs",
            SUPABASE_URL=_url(env, "SUPABASE_URL", None),
            SUPABASE_JWKS_URL=_url(env, "SUPABASE_JWKS_URL", None),
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
