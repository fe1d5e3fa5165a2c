"""An event-sourced service for Replicate jobs: create_app builds the Flask application."""

from __future__ import annotations

import atexit

from flask import Flask

from service import (
    auth,
    cli,
    costs,
    dashboard,
    downloads,
    errors,
    exposure,
    files,
    follow,
    health,
    imaging,
    jobs,
    logs,
    metrics,
    ratelimit,
    schemas,
    storage,
    webhooks,
)
from service.config import Settings
from service.db import open_pool, resolve_database_url


def create_app(overrides: dict | None = None) -> Flask:
    with cli.one_line_errors():  # a `flask` command says a bad setting in one line
        return _create_app(overrides)


def _create_app(overrides: dict | None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(Settings.from_env().as_dict())
    app.config.update(overrides or {})
    logs.configure(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])
    app.extensions["storage"] = check_settings(app.config)
    exposure.guard(app)

    url = resolve_database_url(app.config["DATABASE_URL"], app.config["DATA_DIR"])
    app.config["DATABASE_URL"] = url
    pool = open_pool(url, app.config["DB_POOL_MIN"], app.config["DB_POOL_MAX"],
                     app.config["DB_STATEMENT_TIMEOUT_MS"])
    app.extensions["db_pool"] = pool
    app.extensions["user_tokens"] = auth.UserTokens.from_config(app.config)
    webhooks.record_groups(app)
    atexit.register(pool.close)

    errors.register_handlers(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(dashboard.bp)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(files.bp)
    app.register_blueprint(metrics.bp)
    ratelimit.limit_blueprints(app, (webhooks.bp, jobs.bp))
    health.shutting_down(app)
    cli.register(app)
    follow.register(app)
    return app


def check_settings(config: dict) -> storage.Storage:
    """Parse every module-owned setting now, so a bad one stops startup, not a task;
    the storage, for the pages that show its URLs."""
    imaging.ImagingSettings.from_config(config)
    downloads.DownloadPolicy.from_config(config)
    costs.parse_prices(config.get("REPLICATE_PRICES"))
    if config.get("JOB_CANCEL_AFTER"):
        try:
            schemas.duration_seconds(config["JOB_CANCEL_AFTER"])
        except ValueError as exc:
            raise errors.ConfigError(f"JOB_CANCEL_AFTER {exc}") from None
    return storage.storage_from_config(config)
