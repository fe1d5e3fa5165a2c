"""Who can reach the web app, and what that asks of the settings.

On loopback (127.0.0.1, ::1, localhost) or a Unix socket only this machine reaches the service,
so it may run with no credential, as it does for local work. On any other address it will not
start open: the jobs API spends the operator's Replicate credit and shows every job and image.
It needs API_KEYS or Supabase user-token settings, or ALLOW_OPEN_API=true, which says the
network is private and is logged as a warning at every start. /metrics there answers only with
METRICS_TOKEN (or ALLOW_OPEN_METRICS=true).

The address comes from whatever serves the app: gunicorn.conf.py's on_starting hook checks
its final binds with `main` before gunicorn listens (refusing with one line) and hands them to
the workers as HOST; `flask run` has its --host; scripts/dev.py checks its own
--host. Any other WSGI server: set HOST to the address it listens on.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Any

import click
from flask import Flask

from service.auth import credential_configured
from service.config import Settings
from service.errors import ConfigError, ServiceError

logger = logging.getLogger(__name__)

LOCAL_NAMES = ("localhost",)


def host_of(bind: str) -> str:
    """The host of a bind address: `host`, `host:port`, `[v6]:port`, bare IPv6."""
    bind = bind.strip()
    if bind.startswith("["):
        host, bracket, _ = bind[1:].partition("]")
        if not bracket:
            raise ConfigError(f"HOST: unbalanced [ in {bind!r}")
        return host
    return bind.rsplit(":", 1)[0] if bind.count(":") == 1 else bind


def is_local(bind: str) -> bool:
    """Whether only this machine can connect: loopback or a Unix socket. Anything else, a
    private network address or a name included, counts as reachable by others."""
    if bind.startswith("unix:"):
        return True
    host = host_of(bind).lower()
    if host in LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def served_on(config: Any) -> tuple[str, ...] | None:
    """The addresses this process serves HTTP on: `flask run`'s --host; None under any other
    flask command (a worker or migrate serves nothing); else HOST."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        return (_bind(str(ctx.params.get("host") or "127.0.0.1"), ctx.params.get("port")),) \
            if ctx.info_name == "run" else None
    return tuple(b.strip() for b in str(config.get("HOST") or "127.0.0.1").split(",") if b.strip())


def _bind(host: str, port: object) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def public(binds: tuple[str, ...]) -> tuple[str, ...]:
    """The binds others can reach."""
    return tuple(b for b in binds if not is_local(b))


def refusal(config: Any, binds: tuple[str, ...]) -> str | None:
    """Why the service must not start on these binds with these settings, in one line; else None."""
    exposed = public(binds)
    if not exposed or credential_configured(config) or config.get("ALLOW_OPEN_API"):
        return None
    return (f"refusing to start: the jobs API and dashboard would be open to anyone who can reach "
            f"{', '.join(exposed)} (not loopback); set API_KEYS (or SUPABASE_JWT_SECRET / "
            f"SUPABASE_JWKS_URL for users' access tokens), or ALLOW_OPEN_API=true on a private network")


def guard(app: Flask) -> None:
    """At startup: refuse to serve open off loopback, say when the API is open on purpose, and
    decide whether /metrics answers (app.extensions["public_bind"])."""
    binds = served_on(app.config)
    app.extensions["public_bind"] = bool(public(binds or ()))
    if binds is None:
        return
    problem = refusal(app.config, binds)
    if problem:
        raise (click.ClickException if click.get_current_context(silent=True) else ConfigError)(problem)
    where = ", ".join(binds)
    if app.config.get("ALLOW_OPEN_API") and not credential_configured(app.config):
        logger.warning("the jobs API is open (ALLOW_OPEN_API=true, no API_KEYS or Supabase user-token "
                       "settings): anyone who can reach %s can create jobs and read every job", where,
                       extra={"action": "exposure", "binds": where})
    if app.extensions["public_bind"] and not (app.config.get("METRICS_TOKEN")
                                              or app.config.get("ALLOW_OPEN_METRICS")):
        logger.info("/metrics is off (404) on %s: set METRICS_TOKEN, or ALLOW_OPEN_METRICS=true", where,
                    extra={"action": "exposure"})


def main(argv: list[str]) -> int:
    """Exit 2 with one line on stderr when the settings in the environment must not be served
    on the binds in argv (gunicorn.conf.py runs it in a child process before listening)."""
    try:
        problem = refusal(Settings.from_env().as_dict(), tuple(argv))
    except ServiceError as exc:
        problem = str(exc)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    return 0
