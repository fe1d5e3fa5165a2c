#!/usr/bin/env bash
# Set everything up and run the tests against a real PostgreSQL: the embedded one by
# default, the server named by DATABASE_URL when it is set. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements-dev.txt
scripts/setup_browser.sh
scripts/setup_pg_tools.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
