"""Settings, read once from the environment; every name is listed in .env.example."""

from __future__ import annotations

import os
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


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    DATABASE_URL: str | None = None
    DATA_DIR: str = field(default_factory=lambda: str(ROOT / ".data"))
    DB_POOL_MIN: int = 1
    DB_POOL_MAX: int = 10
    DB_STATEMENT_TIMEOUT_MS: int = 30_000
    LOG_LEVEL: str = "INFO"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        url = env.get("DATABASE_URL", "").strip() or None
        if url and not url.startswith(("postgres://", "postgresql://")):
            raise ConfigError("DATABASE_URL must start with postgresql:// (or postgres://)")
        level = env.get("LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        pool_max = _int(env, "DB_POOL_MAX", 10, 1, 200)
        return cls(
            DATABASE_URL=url,
            DATA_DIR=env.get("DATA_DIR", "").strip() or str(ROOT / ".data"),
            DB_POOL_MIN=_int(env, "DB_POOL_MIN", 1, 0, pool_max),
            DB_POOL_MAX=pool_max,
            DB_STATEMENT_TIMEOUT_MS=_int(env, "DB_STATEMENT_TIMEOUT_MS", 30_000, 0, 3_600_000),
            LOG_LEVEL=level,
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
