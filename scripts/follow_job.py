"""Follow one job until it ends, one line per change, without running the service here:

    .venv/bin/python scripts/follow_job.py JOB_ID     # the service's event stream (SERVICE_URL)
    SUPABASE_URL=... SUPABASE_ANON_KEY=... SUPABASE_EMAIL=... .venv/bin/python scripts/follow_job.py JOB_ID

The same as `flask --app service follow JOB_ID` (service/follow.py), reading its settings
from the environment and .env, with no database connection of its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import click  # noqa: E402

from service.config import Settings  # noqa: E402
from service.follow import follow_command  # noqa: E402


@click.command(params=follow_command.params, help=follow_command.help)
def main(**options: object) -> None:
    from dotenv import load_dotenv

    from service.follow import run

    load_dotenv(Path(__file__).resolve().parent.parent / ".env")
    job_id = str(options.pop("job_id"))
    run(job_id, Settings.from_env().as_dict(), **options)


if __name__ == "__main__":
    main()
