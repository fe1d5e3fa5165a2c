"""Follow one job until it ends, one line per change: `flask --app service follow JOB_ID`, or
`scripts/follow_job.py JOB_ID` on a machine that does not run the service.

Two ways to hear about changes, the same lines either way:

- **Supabase Realtime**, when SUPABASE_URL and SUPABASE_ANON_KEY are set: sign in as a user
  (an access token, or email and password through supabase-py's auth), join the *private*
  Realtime channel `job:<id>`, read the job through PostgREST (row-level security: only its
  owner sees it) and print each Broadcast the database sends there (the jobs trigger of
  sql/009_supabase.sql). Realtime lets only the job's owner join (the policy on
  realtime.messages), so another user is refused, not left waiting. Where the project has no
  such policy, or with `--via changes`, it follows Realtime's Postgres Changes of the job's row
  instead, after checking through PostgREST that the user may see it. See
  service/realtime_follow.py.
- **The service's own stream** otherwise (the embedded default): read GET /api/jobs/<id>, then
  listen to the Server-Sent Events of /api/dashboard/stream (service/changes.py) and read the
  job again whenever it is named.

Exit status: 0 when the job completed, 3 when it failed or was canceled, 1 when following was
refused or impossible (the message says why).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import click
import requests
from flask import Flask, current_app
from flask.cli import with_appcontext

TERMINAL = frozenset({"completed", "failed", "canceled"})
EXIT_ENDED_BADLY = 3


class FollowRefused(Exception):
    """Following the job was refused or is impossible; the message says why."""


def describe(job: dict[str, Any]) -> str:
    """One line: status, progress n/m (predictions finished of expected), outputs stored and
    their URLs, and the error if any. `job` is a jobs row (or the API's view, see from_api)."""
    done = (job.get("predictions_succeeded") or 0) + (job.get("predictions_failed") or 0)
    line = (f"{job['status']:<10} {done}/{job.get('predictions_expected') or 0} predictions, "
            f"{job.get('outputs_processed') or 0} outputs")
    urls = [o["url"] for o in job.get("outputs") or [] if isinstance(o, dict) and o.get("url")]
    line += f"  {' '.join(urls)}" if urls else ""
    return line + (f"  error: {job['error']}" if job.get("error") else "")


def from_api(view: dict[str, Any]) -> dict[str, Any]:
    """GET /api/jobs/<id>'s view with the jobs row's names, as describe reads them."""
    progress = view.get("progress") or {}
    return {**view, "predictions_expected": progress.get("total"),
            "predictions_succeeded": progress.get("succeeded"),
            "predictions_failed": progress.get("failed"), "outputs_processed": progress.get("processed")}


class Printer:
    """Prints a line when what it says changes; knows when the job has ended."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo, self.last, self.status = echo, "", ""

    def show(self, job: dict[str, Any]) -> bool:
        """Print the job if its line changed; True once it has ended."""
        line = describe(job)
        if line != self.last:
            self.echo(f"{datetime.now().strftime('%H:%M:%S')} {line}")
            self.last = line
        self.status = job["status"]
        return self.status in TERMINAL


# --- the service's own stream (SSE) ---------------------------------------------------------

@dataclass(frozen=True)
class Service:
    url: str                  # the running service, e.g. http://127.0.0.1:8000
    api_key: str | None = None


def follow_service(service: Service, job_id: str, printer: Printer) -> None:
    """Until the job ends: read it, then re-read it whenever the change stream names it."""
    session = requests.Session()
    if service.api_key:
        session.headers["Authorization"] = f"Bearer {service.api_key}"
    def shown_and_ended() -> bool:
        return printer.show(from_api(_get_job(session, service.url, job_id)))

    if shown_and_ended():
        return
    while True:
        for event, data in _stream(session, service.url):
            named = event == "jobs" and (job_id in data.get("ids", ()) or "*" in data.get("ids", ()))
            # "ready": (re)connected; anything missed meanwhile is caught by reading again
            if (event == "ready" or named or event == "poll") and shown_and_ended():
                return


def _get_job(session: requests.Session, base: str, job_id: str) -> dict[str, Any]:
    try:
        response = session.get(f"{base}/api/jobs/{job_id}", timeout=(5, 30))
    except requests.RequestException as exc:
        raise FollowRefused(f"cannot reach the service at {base} ({type(exc).__name__}); is it "
                            "running? (--url or SERVICE_URL say where)") from None
    if response.status_code == 404:
        raise FollowRefused(f"no job {job_id} at {base} (or it is not yours)")
    if response.status_code == 401:
        raise FollowRefused(f"{base} wants an API key: set API_KEYS (its first key is sent) or --api-key")
    if response.status_code != 200:
        raise FollowRefused(f"{base} answered HTTP {response.status_code} for job {job_id}")
    return response.json()


def _stream(session: requests.Session, base: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The change stream's events until it ends; ("poll", {}) every 2 s while it is busy."""
    try:
        with session.get(f"{base}/api/dashboard/stream", stream=True, timeout=(5, 60)) as response:
            if response.status_code == 503:  # every stream slot taken: poll instead, for now
                time.sleep(2)
                yield "poll", {}
                return
            if response.status_code != 200:
                raise FollowRefused(f"{base}/api/dashboard/stream answered HTTP {response.status_code}")
            yield from _events(response.iter_lines(decode_unicode=True))
    except (requests.ConnectionError, requests.Timeout):
        time.sleep(1)  # the service restarted, or a proxy cut the stream: connect again
        yield "poll", {}


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


# --- the command ----------------------------------------------------------------------------

def follow(job_id: str, config: dict[str, Any], *, url: str | None = None, api_key: str | None = None,
           token: str | None = None, email: str | None = None, password: str | None = None,
           via: str = "auto", echo: Callable[[str], None] = click.echo) -> str:
    """Follow the job until it ends; its final status."""
    printer = Printer(echo)
    supabase = bool(config.get("SUPABASE_URL") and config.get("SUPABASE_ANON_KEY"))
    if via in ("realtime", "changes") or (via == "auto" and supabase):
        from service.realtime_follow import SupabaseUser, follow_realtime

        user = SupabaseUser.from_settings(config, token=token, email=email, password=password)
        follow_realtime(user, job_id, printer, feature="changes" if via == "changes" else "broadcast")
    else:
        base = (url or config.get("PUBLIC_BASE_URL") or "http://127.0.0.1:8000").rstrip("/")
        keys = config.get("API_KEYS") or ()
        follow_service(Service(base, api_key or (keys[0] if keys else None)), job_id, printer)
    return printer.status


@click.command("follow")
@click.argument("job_id", type=click.UUID)
@click.option("--via", type=click.Choice(["auto", "realtime", "changes", "sse"]), default="auto",
              show_default=True,
              help="realtime: Supabase Realtime's Broadcast on the private channel job:<id>, or Postgres "
                   "Changes when the project has no policy for it; changes: Postgres Changes only; sse: "
                   "the service's own event stream. auto: realtime when SUPABASE_URL and "
                   "SUPABASE_ANON_KEY are set, else sse.")
@click.option("--url", envvar="SERVICE_URL", help="The running service, for sse "
              "[default: PUBLIC_BASE_URL, else http://127.0.0.1:8000].")
@click.option("--api-key", envvar="FOLLOW_API_KEY", help="Bearer key for the service [default: the "
              "first of API_KEYS].")
@click.option("--token", envvar="SUPABASE_ACCESS_TOKEN", help="A Supabase user's access token.")
@click.option("--email", envvar="SUPABASE_EMAIL", help="Sign in as this Supabase user instead.")
@click.option("--password", envvar="SUPABASE_PASSWORD", help="Their password (asked when not given).")
@with_appcontext
def follow_command(job_id: uuid.UUID, via: str, url: str | None, api_key: str | None, token: str | None,
                   email: str | None, password: str | None) -> None:
    """Print one line per change of a job (status, progress, outputs) until it ends."""
    run(str(job_id), current_app.config, via=via, url=url, api_key=api_key, token=token, email=email,
        password=password)


def run(job_id: str, config: dict[str, Any], **options: Any) -> None:
    """follow, with the command line's errors and exit status."""
    if options.get("email") and not options.get("password") and not options.get("token"):
        options["password"] = click.prompt(f"password for {options['email']}", hide_input=True)
    try:
        status = follow(job_id, config, **options)
    except FollowRefused as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None
    if status != "completed":
        raise click.exceptions.Exit(EXIT_ENDED_BADLY)


def register(app: Flask) -> None:
    app.cli.add_command(follow_command)
