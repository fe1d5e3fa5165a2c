#!/usr/bin/env bash
# Set everything up and run the service: embedded PostgreSQL (unless DATABASE_URL is set),
# migrations, the web app under gunicorn; prints the dashboard URL. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements.txt
exec .venv/bin/python scripts/dev.py "$@"
