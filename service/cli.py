"""Flask CLI commands: `flask --app service migrate | replay`."""

from __future__ import annotations

import sys

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from service import migrations
from service import replay as replays
from service.db import connect


def register(app: Flask) -> None:
    app.cli.add_command(migrate_command)
    app.cli.add_command(replay_command)
    app.cli.add_command(worker_command)
    app.cli.add_command(reconcile_command)


def _connect(**kwargs: object):
    return connect(current_app.config["DATABASE_URL"], **kwargs)


@click.command("migrate")
@with_appcontext
def migrate_command() -> None:
    """Apply the sql/migrations/NNN_*.sql not yet applied, then sql/*.sql if any changed."""
    with _connect(autocommit=True) as conn:
        try:
            applied = migrations.migrate(conn)
        except migrations.MigrationError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"applied {', '.join(applied)}" if applied else "database is up to date")


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
def replay_command(check: bool, stream: str | None, batches: bool) -> None:
    """Rebuild the projections (jobs, predictions, outputs) from the events, beside the live
    ones, while webhooks keep being recorded; then write only the rows that differ."""
    def progress(step: replays.Step) -> None:
        left = f", about {step.left:,.0f} s left" if step.number < len(replays.STAGES) else ""
        click.echo(f"[{step.number}/{len(replays.STAGES)}] {step.stage}: {step.rows:,} rows, "
                   f"{step.seconds:,.1f} s, {step.rate:,.0f} events/s{left}", err=True)

    with _connect() as conn:
        try:
            result = replays.replay(conn, stream=stream, check=check,
                                    batches=replays.WRITE_BATCH if batches else 0,
                                    progress=progress)
        except replays.ReplayBusy as exc:
            raise click.ClickException(str(exc)) from exc
    _summarise(result, check)
    if check and result.differences:
        sys.exit(1)


def _summarise(result: replays.ReplayResult, check: bool) -> None:
    click.echo(f"{result.events:,} events ({result.caught_up:,} recorded during the replay), "
               f"{result.jobs:,} jobs, {result.predictions:,} predictions "
               f"in {result.seconds:.2f} s ({result.events_per_second:,.0f} events/s)")
    for difference in result.samples:
        click.echo(f"  {difference}")
    if result.differences > len(result.samples):
        click.echo(f"  … and {result.differences - len(result.samples):,} more")
    if check:
        click.echo(f"{result.differences:,} differences from the live projection; nothing changed"
                   if result.differences else "the live projection matches the events")
    elif result.committed:
        click.echo(f"rebuilt: {result.differences:,} rows corrected in a cut-over of "
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
def worker_command(once: bool) -> None:
    """Run queued tasks (submissions, cancels, post-processing) and the reconciler."""
    import signal
    import threading

    from service.reconciler import reconcile
    from service.worker import Worker

    ctx = worker_context(current_app._get_current_object())
    worker = Worker(ctx, handlers(), poll_seconds=current_app.config["WORKER_POLL_SECONDS"],
                    lease_seconds=current_app.config["WORKER_LEASE_SECONDS"],
                    periodic=lambda: reconcile(ctx),
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
def reconcile_command() -> None:
    """Poll Replicate once about quiet jobs and retry failed submissions."""
    from service.reconciler import reconcile

    done = reconcile(worker_context(current_app._get_current_object()))
    click.echo(", ".join(f"{k}: {v}" for k, v in sorted(done.items())) or "nothing to do")
