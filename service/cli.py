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


def _connect(**kwargs: object):
    return connect(current_app.config["DATABASE_URL"], **kwargs)


@click.command("migrate")
@with_appcontext
def migrate_command() -> None:
    """Apply the sql/NNN_*.sql migrations not yet applied."""
    with _connect(autocommit=True) as conn:
        try:
            applied = migrations.migrate(conn)
        except migrations.MigrationError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"applied {', '.join(applied)}" if applied else "database is up to date")


@click.command("replay")
@with_appcontext
@click.option("--check", is_flag=True,
              help="Rebuild in a scratch transaction, list differences, change nothing; "
                   "exit 1 if any.")
@click.option("--job", "stream", metavar="ID", help="Rebuild only this job (or orphan prediction).")
def replay_command(check: bool, stream: str | None) -> None:
    """Rebuild the projections (jobs, predictions, outputs) from the events."""
    with _connect() as conn:
        total = len(replays.PHASES)
        with click.progressbar(length=total, label="replaying", show_pos=True,
                               file=sys.stderr) as bar:
            def progress(phase: str, rows: int) -> None:
                bar.label = f"rebuilt {phase} ({rows:,} rows)"
                bar.update(1)
            result = replays.replay(conn, stream=stream, check=check, progress=progress)
    _summarise(result, check)
    if check and result.differences:
        sys.exit(1)


def _summarise(result: replays.ReplayResult, check: bool) -> None:
    click.echo(f"{result.events:,} events, {result.jobs:,} jobs, {result.predictions:,} predictions "
               f"in {result.seconds:.2f} s ({result.events_per_second:,.0f} events/s)")
    for difference in result.samples:
        click.echo(f"  {difference}")
    if result.differences > len(result.samples):
        click.echo(f"  … and {result.differences - len(result.samples):,} more")
    if check:
        click.echo(f"{result.differences:,} differences from the live projection; nothing changed"
                   if result.differences else "the live projection matches the events")
    elif result.committed:
        click.echo(f"rebuilt: {result.differences:,} rows corrected")
    else:
        click.echo("rebuilt: the projection already matched the events; nothing written")
