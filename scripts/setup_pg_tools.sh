#!/usr/bin/env bash
# Tools some tests need from Debian, never a reconfiguration of a running server:
#  * wal2json (postgresql-15-wal2json), the plugin Supabase Realtime decodes the WAL with,
#    for tests/test_realtime.py on a private PostgreSQL 15 cluster;
#  * pg_partman (postgresql-15-partman), which the service hands events' partitions to where
#    the server has it (sql/store.sql, manage_event_partitions), for tests/test_partman.py;
#  * PgBouncer, a transaction-mode pooler standing in for Supavisor in tests/test_pooler.py.
#    Only its binary is unpacked into .venv/pgbouncer (apt-get download): installing the
#    package would also register and, on a systemd machine, start a pgbouncer service.
# Root with apt-get installs what is missing; otherwise this says so and those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
pg_config=/usr/lib/postgresql/15/bin/pg_config
can_install() { [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; }
apt_install() {
  apt-get install -y -qq "$@" >&2 || { apt-get update -qq >&2 && apt-get install -y -qq "$@" >&2; }
}

if [[ ! -x $pg_config ]]; then
  echo "setup: no PostgreSQL 15 in /usr/lib/postgresql/15; the Realtime and TLS tests will skip" >&2
elif [[ ! -f "$("$pg_config" --pkglibdir)/wal2json.so" ]]; then
  if can_install; then
    echo "setup: installing postgresql-15-wal2json (apt-get)" >&2
    apt_install postgresql-15-wal2json || echo "setup: could not install wal2json; the Realtime test will skip" >&2
  else
    echo "setup: wal2json is missing and this is not root with apt-get; install postgresql-15-wal2json" \
         "to run the Realtime test (it will skip)" >&2
  fi
fi

if [[ -x $pg_config && ! -f "$("$pg_config" --sharedir)/extension/pg_partman.control" ]]; then
  if can_install; then
    echo "setup: installing postgresql-15-partman (apt-get)" >&2
    apt_install postgresql-15-partman || echo "setup: could not install pg_partman; the pg_partman tests will skip" >&2
  else
    echo "setup: pg_partman is missing and this is not root with apt-get; install postgresql-15-partman" \
         "to run the pg_partman tests (they will skip)" >&2
  fi
fi

if ! command -v pgbouncer >/dev/null 2>&1 && [[ ! -x .venv/pgbouncer/usr/sbin/pgbouncer ]]; then
  if can_install; then
    echo "setup: unpacking pgbouncer into .venv/pgbouncer (apt-get download)" >&2
    work=$(mktemp -d)
    if apt_install libc-ares2 libevent-2.1-7 &&
       (cd "$work" && apt-get download pgbouncer >&2 2>/dev/null) &&
       dpkg-deb -x "$work"/pgbouncer_*.deb .venv/pgbouncer; then
      :
    else
      echo "setup: could not unpack pgbouncer; the pooler test will skip" >&2
    fi
    rm -rf "$work"
  else
    echo "setup: pgbouncer is missing and this is not root with apt-get; the pooler test will skip" >&2
  fi
fi
