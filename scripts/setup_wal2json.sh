#!/usr/bin/env bash
# The Realtime test (tests/test_realtime.py) decodes the WAL of a private PostgreSQL 15 with
# wal2json, the output plugin Supabase Realtime reads changes with. Install Debian's
# postgresql-15-wal2json when PostgreSQL 15 is here and the plugin is not; as root only
# (apt-get), otherwise say so: the test then skips with the same message. Installing it only
# adds a library: no running server is restarted or reconfigured.
set -euo pipefail
pg_config=/usr/lib/postgresql/15/bin/pg_config
if [[ ! -x $pg_config ]]; then
  echo "setup: no PostgreSQL 15 in /usr/lib/postgresql/15; the Realtime (wal2json) test will skip" >&2
  exit 0
fi
if [[ -f "$("$pg_config" --pkglibdir)/wal2json.so" ]]; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: wal2json is missing and this is not root with apt-get; install postgresql-15-wal2json" \
       "to run the Realtime test (it will skip)" >&2
  exit 0
fi
echo "setup: installing postgresql-15-wal2json (apt-get)" >&2
if ! apt-get install -y -qq postgresql-15-wal2json >&2; then
  apt-get update -qq >&2 && apt-get install -y -qq postgresql-15-wal2json >&2 ||
    echo "setup: could not install postgresql-15-wal2json; the Realtime test will skip" >&2
fi
