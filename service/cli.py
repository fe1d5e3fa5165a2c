"""Flask CLI commands: `flask --app service migrate | replay | worker | reconcile | retry | prune`.

Each command is for a person at a terminal first: a configuration problem (a missing or
malformed setting, a database that cannot be reached or is not migrated) ends it with one
line naming the setting and exit status 2, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click
import psycopg
from flask import Flask, current_app
from flask.cli import with_appcontext

from service import migrations
from service import replay as replays
from service.db import connect, queries, redact
from service.errors import ConfigError


class SettingError(click.ClickException):
    """A setting keeps the command from running: click prints `Error: <message>`."""

    exit_code = 2  # as ./run.sh's own configuration errors


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Inside a `flask` command (also while it builds the app), a configuration error is the
    command's one-line error; anywhere else (gunicorn, tests) it is raised as it is. Also a
    decorator."""
    try:
        yield
    except ConfigError as exc:
        if click.get_current_context(silent=True) is None:
            raise
        raise SettingError(str(exc)) from exc


def register(app: Flask) -> None:
    app.cli.add_command(migrate_command)
    app.cli.add_command(replay_command)
    app.cli.add_command(worker_command)
    app.cli.add_command(reconcile_command)
    app.cli.add_command(retry_command)
    app.cli.add_command(prune_command)


def plural(n: int, noun: str) -> str:
    """`1 job`, `2 jobs`, `1,000 jobs`."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _connect(**kwargs: object) -> psycopg.Connection:
    url = current_app.config["DATABASE_URL"]
    try:
        return connect(url, **kwargs)
    except psycopg.OperationalError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[0] if lines else type(exc).__name__
        # The app's pool is trying the same server in the background and logs each failure;
        # stopped first, none of its lines can come after this command's one line.
        pool = current_app.extensions.get("db_pool")
        if pool is not None:
            pool.close(timeout=5)
        raise SettingError(f"cannot connect to the database at DATABASE_URL {redact(url)}: "
                           f"{reason}") from exc


def require_migrated() -> None:
    """The database answers and has every migration this code ships with."""
    from service.health import expected_migrations

    with _connect() as conn:
        try:
            applied = {row["version"] for row in conn.execute(queries["readiness"])}
        except psycopg.errors.UndefinedTable:
            applied = set()
    missing = sorted(expected_migrations() - applied)
    if missing:
        raise SettingError(f"the database at DATABASE_URL {redact(current_app.config['DATABASE_URL'])} "
                           f"lacks {plural(len(missing), 'migration')} (first {missing[0]}); "
                           "run: flask --app service migrate")


@click.command("migrate")
@with_appcontext
@one_line_errors()
def migrate_command() -> None:
    """Apply the sql/migrations/NNN_*.sql not yet applied, then sql/*.sql if any changed."""
    with _connect(autocommit=True) as conn:
        try:
            applied = migrations.migrate(conn, event_partitions=current_app.config["EVENT_PARTITIONS"])
        except migrations.MigrationError as exc:
            raise click.ClickException(str(exc)) from exc
        keeper = migrations.event_partitions_keeper(conn)
    click.echo(f"applied {', '.join(applied)}" if applied else "database is up to date")
    click.echo("events' partitions: kept by pg_partman" if keeper == "pg_partman"
               else "events' partitions: kept by the built-in upkeep")


@click.command("replay")
@with_appcontext
@click.option("--check", is_flag=True,
              help="Rebuild beside the live tables, list differences, change nothing; "
                   "exit 1 if any.")
@click.option("--job", "stream", metavar="ID", help="Rebuild only this job (or orphan prediction).")
@click.option("--in-batches", "batches", is_flag=True,
              help="Write the rows that differ a few hundred jobs at a time before the cut-over, "
                   "so webhooks never wait long even when every row differs (after a change of "
                   "the fold's rules). Stopped midway, it leaves the jobs it wrote rebuilt.")
@click.option("--keep-free", type=click.FloatRange(min=0), default=2.0, show_default=True,
              metavar="GB", help="Disk to leave free on the database server beside a full replay's "
                                 "scratch copy, for the webhooks recorded while it runs.")
@click.option("--no-disk-check", is_flag=True,
              help="Start a full replay even when the database server's disk looks too full.")
@one_line_errors()
def replay_command(check: bool, stream: str | None, batches: bool, keep_free: float,
                   no_disk_check: bool) -> None:
    """Rebuild the projections (jobs, predictions, outputs) from the events, beside the live
    ones, while webhooks keep being recorded; then write only the rows that differ."""
    require_migrated()

    def progress(step: replays.Step) -> None:
        left = f", about {step.left:,.0f} s left" if step.number < len(replays.STAGES) else ""
        click.echo(f"[{step.number}/{len(replays.STAGES)}] {step.stage}: {plural(step.rows, 'row')}, "
                   f"{step.seconds:,.1f} s, {step.rate:,.0f} events/s{left}", err=True)

    with _connect() as conn:
        if stream is None:
            _check_disk(conn, keep_free, no_disk_check)
        try:
            result = replays.replay(conn, stream=stream, check=check,
                                    batches=replays.WRITE_BATCH if batches else 0,
                                    progress=progress)
        except replays.ReplayBusy as exc:
            raise click.ClickException(str(exc)) from exc
    _summarise(result, check)
    if check and result.differences:
        sys.exit(1)


def _check_disk(conn: psycopg.Connection, keep_free: float, skip: bool) -> None:
    """A full replay copies the projections on the database server's disk: refuse to start
    one that would fill it (appends would then fail too), where this process can see that
    disk; otherwise say what it needs."""
    space = replays.scratch_space(conn)
    reserve = int(keep_free * 1024 ** 3)
    if space.free is None:
        click.echo(f"a full replay needs about {_size(space.need)} free on the database server's disk "
                   "(not visible from here: check it there, docs/deploy.md)", err=True)
    elif space.free < space.need + reserve and not skip:
        raise click.ClickException(
            f"a full replay needs about {_size(space.need)} on the database server's disk for its "
            f"scratch copy of the projections (they take {_size(space.projections)}), plus "
            f"{_size(reserve)} left free for webhooks (--keep-free), and {_size(space.free)} is free "
            f"at {space.directory}; free some disk first (docs/deploy.md), or pass "
            "--no-disk-check to start anyway")
    else:
        click.echo(f"a full replay needs about {_size(space.need)} of disk; {_size(space.free)} is free "
                   f"at {space.directory}", err=True)


def _summarise(result: replays.ReplayResult, check: bool) -> None:
    click.echo(f"{plural(result.events, 'event')}, {plural(result.jobs, 'job')}, "
               f"{plural(result.predictions, 'prediction')} in {result.seconds:.2f} s "
               f"({result.events_per_second:,.0f} events/s); {result.caught_up:,} of the events "
               "were recorded while it ran")
    for difference in result.samples:
        click.echo(f"  {difference}")
    if result.differences > len(result.samples):
        click.echo(f"  … and {result.differences - len(result.samples):,} more")
    if check:
        click.echo(f"{plural(result.differences, 'difference')} from the live projection; nothing changed"
                   if result.differences else "the live projection matches the events")
    elif result.committed:
        click.echo(f"rebuilt: {plural(result.differences, 'row')} corrected in a cut-over of "
                   f"{result.cut_over_ms:,.0f} ms (the only time webhooks waited)")
    else:
        click.echo("rebuilt: the projection already matched the events; nothing written")


def worker_context(app: Flask, worker: str | None = None):
    """Everything a worker's handlers use, for this app: its pool, settings and clients."""
    from service.worker import Context, worker_name

    return Context(pool=app.extensions["db_pool"], worker=worker or worker_name(), config=app.config,
                   clients=clients(app.config))


def clients(config) -> dict:
    """The outside services a worker's handlers use."""
    from service.replicate import from_settings
    from service.storage import storage_from_config

    return {"replicate": from_settings(config), "storage": storage_from_config(config)}


def handlers() -> dict:
    from service.postprocess import ProcessOutput
    from service.submissions import CancelPrediction, SubmitPrediction

    return {"submit_prediction": SubmitPrediction(), "cancel_prediction": CancelPrediction(),
            "process_output": ProcessOutput()}


@click.command("worker")
@click.option("--once", is_flag=True, help="Run the tasks that are ready now, then exit.")
@with_appcontext
@one_line_errors()
def worker_command(once: bool) -> None:
    """Run queued tasks (submissions, cancels, post-processing), the reconciler, and the store's
    upkeep (partitions of events created ahead)."""
    import signal
    import threading

    from service.reconciler import reconcile
    from service.store import upkeep
    from service.worker import Worker

    require_migrated()
    ctx = worker_context(current_app._get_current_object())

    def periodic() -> None:
        try:
            # partitions ahead of the appends, daily retention: before the reconciler, which may fail
            upkeep(ctx.pool, current_app.config["EVENTS_RAW_RETENTION_DAYS"])
        finally:
            reconcile(ctx)

    worker = Worker(ctx, handlers(), poll_seconds=current_app.config["WORKER_POLL_SECONDS"],
                    lease_seconds=current_app.config["WORKER_LEASE_SECONDS"],
                    periodic=periodic,
                    periodic_every=current_app.config["RECONCILE_INTERVAL_SECONDS"])
    if once:
        while worker.run_once():
            pass
        return
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    worker.run_forever(stop)


@click.command("reconcile")
@with_appcontext
@one_line_errors()
def reconcile_command() -> None:
    """Poll Replicate once about quiet jobs, retry failed submissions, end stalled jobs."""
    from service.reconciler import reconcile

    require_migrated()
    done = reconcile(worker_context(current_app._get_current_object()))
    click.echo(reconciled(done))


# What reconcile() counts, as a person reads it: the noun counted and what happened to it.
_RECONCILED = {"polled": ("prediction", "polled, changed"),
               "unchanged": ("prediction", "polled, unchanged"),
               "poll_failed": ("prediction", "could not be polled"),
               "resubmitted": ("submission", "retried"),
               "stalled": ("stalled job", "ended"),
               "stalled_unexplained": ("stalled job", "left alone: nothing to record (see the log)")}


def reconciled(done: dict[str, int]) -> str:
    """One line, e.g. `1 prediction polled, changed; 2 submissions retried`."""
    parts = [f"{plural(n, _RECONCILED[kind][0])} {_RECONCILED[kind][1]}" if kind in _RECONCILED
             else f"{kind}: {n:,}" for kind, n in done.items() if n]
    return "; ".join(parts) or "nothing to do: no quiet job, no failed submission, no stalled job"


def _since(text: str | None) -> float | None:
    """--since as seconds: "2h", "90m", "1h30m", "7d", or plain seconds."""
    if text is None:
        return None
    from service.schemas import duration_seconds

    try:
        days = text.strip().removesuffix("d")
        if text.strip().endswith("d") and days.isdigit():
            return float(days) * 86400
        return duration_seconds(text)
    except ValueError as exc:
        raise click.BadParameter(f'{exc} (or days, like "7d")', param_hint="--since") from None


@click.command("retry")
@click.option("--status", type=click.Choice(["failed", "completed"]), required=True,
              help="Jobs that ended so: failed, or completed with some predictions failed.")
@click.option("--since", metavar="DURATION", help='Only jobs that ended this recently: "2h", "30m", "7d".')
@click.option("--model", metavar="M", help="Only jobs of this model (owner/name), deployment or version.")
@click.option("--error", "error", metavar="TEXT",
              help="Only jobs whose failed predictions' error contains TEXT.")
@click.option("--dry-run", is_flag=True, help="Say which jobs would be retried; submit nothing.")
@with_appcontext
@one_line_errors()
def retry_command(status: str, since: str | None, model: str | None, error: str | None,
                  dry_run: bool) -> None:
    """Retry the failed, canceled and aborted predictions of every matching job, as
    POST /api/jobs/<id>/retry does: once per job and round, so running it twice submits
    each prediction once."""
    from service import commands

    seconds = _since(since)
    require_migrated()
    with _connect() as conn:
        since_at = None if seconds is None else conn.execute(
            "SELECT now() - make_interval(secs => %s) AS t", (seconds,)).fetchone()["t"]
        jobs = conn.execute(queries["retry_candidates"], {
            "status": status, "since": since_at, "model": model, "error": error}).fetchall()
    if dry_run or not jobs:
        click.echo(f"{plural(len(jobs), 'job')} would be retried" if dry_run
                   else "no job matches: nothing retried")
        for job in jobs[:20] if dry_run else []:
            click.echo(f"  {job['id']} {job['model'] or ''} {job['error'] or ''}".rstrip())
        return
    retried, predictions, skipped = 0, 0, []
    with _connect(autocommit=True) as conn, click.progressbar(jobs, label="retrying", show_pos=True) as bar:
        for job in bar:
            try:
                with conn.transaction():
                    _, ids = commands.retry_job(conn, job["id"], source="cli")
            except commands.NotRetryable as exc:
                skipped.append(exc.message)
                continue
            retried, predictions = retried + bool(ids), predictions + len(ids)
    click.echo(f"retried {plural(retried, 'job')} ({plural(predictions, 'prediction')} submitted again)"
               + (f"; {plural(len(skipped), 'job')} skipped" if skipped else ""))
    for reason in skipped[:20]:
        click.echo(f"  skipped: {reason}")
@click.command("prune")
@click.option("--dry-run", is_flag=True, help="Say what would be dropped; drop nothing.")
@with_appcontext
@one_line_errors()
def prune_command(dry_run: bool) -> None:
    """Drop the delivery log's days older than EVENTS_RAW_RETENTION_DAYS (whole partitions;
    events are never touched)."""
    from service import store

    require_migrated()
    days = current_app.config["EVENTS_RAW_RETENTION_DAYS"]
    if days == 0:
        click.echo("EVENTS_RAW_RETENTION_DAYS=0: the delivery log is kept forever; nothing to drop")
        return
    with _connect(autocommit=True) as conn:
        pruned = store.prune(conn, days, dry_run=dry_run)
    verb = "would drop" if dry_run else "dropped"
    for p in pruned:
        click.echo(f"{verb} {p.partition} ({p.day.isoformat()}, {_size(p.bytes)})")
    total = sum(p.bytes for p in pruned)
    click.echo(f"{verb} {plural(len(pruned), 'day')} of the delivery log older than {days} days: "
               f"{_size(total)} {'would be ' if dry_run else ''}freed" if pruned
               else f"nothing to drop: no day of the delivery log is older than {days} days")


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TB"
