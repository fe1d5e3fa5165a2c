"""The append benchmark's ratio in CPU instructions, which a busy machine does not move.

    .venv/bin/python scripts/bench/append_instructions.py [--appends 800] [--warmup 400]

scripts/bench/append.py measures appends/s against bare inserts/s, and on a shared
two-core machine both move with whatever else runs. This counts instructions instead:
valgrind's callgrind runs a PostgreSQL backend in single-user mode (`postgres --single`)
over the same rows as SQL statements, one transaction each, first append_event on a freshly
migrated database, then bare INSERTs into a plain table with the events table's columns,
then the event recorded alone: INSERT … ON CONFLICT (event_key) DO NOTHING into a copy of
the events table with its keys, indexes and checks, and no fold (what an append would
cost if the fold were free: the ceiling of the ratio). Each is run twice, with --warmup
rows and with --warmup + --appends rows, and the difference divided by --appends is the
cost of one row once the session's caches are warm (the same for every run: callgrind
counts, it does not time). With --what-if, also appends in a database where the job-level
work (derived job columns, the post-event hook) is taken out of the transaction, as a
worker would do it later: what that design, which the design card rules out, would cost.
With --variant FILE, also appends on a database where FILE's SQL ran after the migrations:
a change to try (e.g. an edited copy of sql/fold.sql: its CREATE OR REPLACE statements
replace the functions), or a statement taken out to see its cost.

Needs valgrind (Debian: `apt-get install -y valgrind`) and a PostgreSQL server's programs
(initdb, postgres: `pg_config --bindir`, /usr/lib/postgresql/*/bin, or the embedded
pgserver's). PostgreSQL will not run as root: as root the cluster belongs to the
`postgres` user, which must exist. fsync and full-page writes are off in the scratch
cluster: they cost I/O, not instructions, and full-page images would land on whichever
run follows a checkpoint. Takes a few minutes: callgrind runs the backend ~50x slower.
"""

from __future__ import annotations

import argparse
import collections
import glob
import itertools
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# append imports common, which puts `service` on the path
from append import BARE_TABLE, Row, workload
from common import RECORDED_TABLE

from service import db, migrations

GOAL_RATIO = 0.5  # the append benchmark's goal: appends at least half as fast as bare inserts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--appends", type=int, default=800, help="rows measured")
    parser.add_argument("--warmup", type=int, default=400, help="rows before them (caches, plans)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--bindir", help="PostgreSQL's programs (default: found)")
    parser.add_argument("--what-if", action="store_true",
                        help="also count appends with the job-level work out of the transaction")
    parser.add_argument("--variant", action="append", default=[], type=Path, metavar="SQL_FILE",
                        help="also count appends on a database with this SQL run after the migrations "
                             "(a change to try, or a part taken out to see its cost); repeatable")
    return parser.parse_args()


def find_bindir() -> Path:
    candidates = []
    if shutil.which("pg_config"):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(found.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    try:
        import pgserver

        candidates.append(str(Path(pgserver.__file__).parent / "pginstall" / "bin"))
    except ImportError:
        pass
    for candidate in candidates:
        if (Path(candidate) / "postgres").exists() and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    sys.exit("error: no PostgreSQL server programs found (initdb, postgres); pass --bindir")


def as_owner(argv: list[str], owner: str | None, **kwargs) -> subprocess.CompletedProcess:
    if owner:
        argv = ["su", owner, "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]
    return subprocess.run(argv, check=True, **kwargs)


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# How each kind of run writes a row ({} being its values).
WRITES = {
    "append": "SELECT * FROM append_event({});",
    "bare": "INSERT INTO bare_events (event_key, stream, type, data, metadata) VALUES ({});",
    "alone": "INSERT INTO recorded_events (event_key, stream, type, data, metadata) VALUES ({}) "
             "ON CONFLICT (event_key) DO NOTHING;",
}
# --what-if: the same appends in a database where the job-level work is taken out of the
# append's transaction (the job's derived columns and the post-event hook, which a worker
# would then do later); the event, the prediction and output folds and job_activity stay.
# What an append would cost under that design, which the design card rules out today.
# Changes only that scratch database, never the project's functions. The wrapper around
# touch_job costs a call of its own, so the figure errs on the slow side.
WHAT_IF_SQL = """
    ALTER FUNCTION touch_job(uuid, events, boolean) RENAME TO touch_job_with_derivation;
    CREATE FUNCTION touch_job(p_job uuid, e events, p_derive boolean) RETURNS void
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM touch_job_with_derivation(p_job, e, false);  -- job_activity only
    END $$;
    CREATE OR REPLACE FUNCTION on_event_applied(e events) RETURNS void
    LANGUAGE plpgsql AS $$ BEGIN END $$;
"""
WHAT_IF = "no_job_work"


def statements(rows: list[Row], kind: str) -> str:
    """One statement per row, each its own transaction, as single-user mode reads them (-j:
    a statement ends with a semicolon and an empty line)."""
    out = ["SET jit = off;\n\n"]
    for r in rows:
        values = (f"{literal(r.key)}, {literal(r.stream)}, {literal(r.type)}, "
                  f"{literal(json.dumps(r.data))}::jsonb, {literal(json.dumps(r.metadata))}::jsonb")
        out.append(WRITES[kind].format(values) + "\n\n")
    return "".join(out)


def instructions(bindir: Path, pgdata: Path, database: str, script: Path, owner: str | None) -> int:
    out = pgdata.parent / "callgrind.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            str(bindir / "postgres"), "--single", "-j", "-D", str(pgdata), database]
    with script.open() as stdin:
        as_owner(argv, owner, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    sys.exit(f"error: no totals in {out}")


def main() -> None:
    args = parse_args()
    if not shutil.which("valgrind"):
        sys.exit("error: valgrind is needed (Debian: apt-get install -y valgrind)")
    bindir = Path(args.bindir) if args.bindir else find_bindir()
    owner = None
    if os.geteuid() == 0:
        owner = "postgres"
        try:
            pwd.getpwnam(owner)
        except KeyError:
            sys.exit("error: running as root, and there is no `postgres` user to own the scratch cluster")
    rows = list(itertools.islice(workload(args.seed), args.warmup + args.appends))
    with tempfile.TemporaryDirectory(prefix="rjs-callgrind-") as tmp:
        work = Path(tmp)
        pgdata = work / "data"
        if owner:
            shutil.chown(work, owner)
        as_owner([str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
                  "--no-sync"], owner, stdout=subprocess.DEVNULL)
        with (pgdata / "postgresql.conf").open("a") as conf:
            conf.write("fsync = off\nfull_page_writes = off\nsynchronous_commit = off\njit = off\n"
                       "max_wal_size = 10GB\nautovacuum = off\nlisten_addresses = ''\n")
        as_owner([str(bindir / "pg_ctl"), "-D", str(pgdata), "-o", f"-k {work}", "-w", "-l",
                  str(work / "log"), "start"], owner, stdout=subprocess.DEVNULL)
        try:
            url = f"postgresql://postgres@/postgres?host={work}"
            with db.connect(url, autocommit=True) as conn:
                conn.execute("CREATE DATABASE bench")
            with db.connect(url.replace("/postgres?", "/bench?"), autocommit=True) as conn:
                migrations.migrate(conn)
                conn.execute(BARE_TABLE)
                conn.execute(RECORDED_TABLE)
            # appends on databases changed by SQL first: kind -> that SQL
            changed = {f"variant_{i}": path.read_text() for i, path in enumerate(args.variant, 1)}
            if args.what_if:
                changed[WHAT_IF] = WHAT_IF_SQL
            runs = [*WRITES, *changed]
            with db.connect(url, autocommit=True) as conn:
                for kind in runs:
                    for size in ("warm", "full"):
                        conn.execute(f"CREATE DATABASE db_{kind}_{size} TEMPLATE bench")
            for kind, sql in changed.items():
                for size in ("warm", "full"):
                    scratch = url.replace("/postgres?", f"/db_{kind}_{size}?")
                    with db.connect(scratch, autocommit=True) as conn:
                        conn.execute(sql)
        finally:
            as_owner([str(bindir / "pg_ctl"), "-D", str(pgdata), "-w", "stop"], owner,
                     stdout=subprocess.DEVNULL)
        per_row = {}
        for kind in runs:
            counts = {}
            for size, part in (("warm", rows[:args.warmup]), ("full", rows)):
                name = f"{kind}_{size}"
                script = work / f"{name}.sql"
                script.write_text(statements(part, "append" if kind in changed else kind))
                if owner:
                    shutil.chown(script, owner)
                counts[size] = instructions(bindir, pgdata, f"db_{name}", script, owner)
                print(f"  {name:<17} {len(part):>5} rows: {counts[size]:,} instructions", flush=True)
            per_row[kind] = (counts["full"] - counts["warm"]) / args.appends
    append, bare, alone = per_row["append"], per_row["bare"], per_row["alone"]
    counted = collections.Counter(r.type for r in rows[args.warmup:])
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(counted.items()))
    print(f"PostgreSQL {bindir}; {args.appends:,} rows after {args.warmup:,} ({kinds})")
    print(f"instructions per row: append {append:,.0f}, bare insert {bare:,.0f}, "
          f"event alone {alone:,.0f}")
    print(f"ratio: bare / append = {bare / append:.2f} (the append benchmark's goal, appends/s >= "
          f"{GOAL_RATIO} x bare inserts/s, asks for >= {GOAL_RATIO} if both were CPU-bound alike)")
    print(f"ceiling: bare / event alone = {bare / alone:.2f} (the ratio if the fold cost nothing); "
          f"the fold is {append - alone:,.0f} instructions per append")
    if WHAT_IF in per_row:
        moved = per_row[WHAT_IF]
        print(f"what if the job-level work left the append's transaction: {moved:,.0f} per append, "
              f"ratio bare / that = {bare / moved:.2f}")
    for i, path in enumerate(args.variant, 1):
        variant = per_row[f"variant_{i}"]
        print(f"with {path}: {variant:,.0f} per append ({100 * (variant / append - 1):+.1f}%), "
              f"ratio bare / that = {bare / variant:.2f}")


if __name__ == "__main__":
    main()
