"""scale.py's append figure in CPU instructions, on the stores scale.py --keep kept.

    .venv/bin/python scripts/bench/scale_instructions.py --data-dir DIR \
        [--config-file FILE] [--databases bench_scale_1000000,bench_scale_20000000,...]

scale.py times appends (webhooks/s) at 1M and 20M events and on the unpartitioned
baselines at 1M, and on a shared two-core machine its rounds of one store move by 2-3x,
more than the 10% its goals are about. This counts what a webhook costs the backend in
instructions instead, which load does not move: valgrind's callgrind runs the server in
single-user mode (`postgres --single`) over each kept database, with the same webhooks
scale.py appends (`append_webhook`, one transaction each, new jobs made first), twice: with
--warmup webhooks and with --warmup + --appends; the difference over --appends is one
webhook's cost with the session's caches warm. What it cannot see is waiting: reads from
the page cache or the disk, and the commit's flush, cost the same few instructions however
long they take. So it tells the work of an append at each size apart from the I/O.

The server must be stopped (single-user mode takes the data directory itself); the cluster
belongs to the user `postgres` when run as root. Full-page writes are off for the run
(a page's first change after the start-up checkpoint would log the whole page: the warm-up
absorbs most, not all, and which pages is chance); fsync stays as configured. Each
database gets --warmup + --appends webhooks more per count, as scale.py's rounds add theirs.
--function-diff prints where the instructions per webhook differ most between the first
database and each other one (callgrind_annotate, inclusive).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from append_instructions import as_owner, find_bindir, literal
from scale import JOB_CREATED, round_webhooks

from service.commands import new_job_id


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, type=Path, help="the stopped cluster's data directory")
    parser.add_argument("--config-file", help="its postgresql.conf, where it is not in the data directory "
                                              "(Debian: /etc/postgresql/15/main/postgresql.conf)")
    parser.add_argument("--databases", default="bench_scale_1000000,bench_scale_20000000",
                        help="the databases, comma-separated; ratios are against the first")
    parser.add_argument("--appends", type=int, default=600, help="webhooks measured")
    parser.add_argument("--warmup", type=int, default=300, help="webhooks before them (caches, plans)")
    parser.add_argument("--repeat", type=int, default=1, help="counts per database, taking turns")
    parser.add_argument("--bindir", help="PostgreSQL's programs (default: found)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/scale-callgrind"),
                        help="where the callgrind files are left (for callgrind_annotate)")
    parser.add_argument("--function-diff", type=int, default=0, metavar="N",
                        help="print the N functions whose inclusive instructions per webhook differ "
                             "most from the first database's")
    return parser.parse_args()


def script(webhooks: int, jobs: int) -> str:
    """`jobs` new jobs, then `webhooks` webhooks over them, as scale.py's rounds send them
    (scale.round_webhooks; ids new each time, so nothing is a duplicate). Single-user mode
    (-j) ends a statement at a semicolon and an empty line; each statement is its own
    transaction."""
    ids = [new_job_id() for _ in range(jobs)]
    out = ["SET jit = off;\n\n"]
    created = literal(json.dumps(JOB_CREATED))
    for job in ids:
        out.append(f"SELECT * FROM append_event({literal('created:' + job)}, {literal(job)}, "
                   f"'job.created', {created}::jsonb);\n\n")
    for webhook_id, job, body, metadata in round_webhooks(ids, webhooks):
        out.append(f"SELECT * FROM append_webhook({literal(webhook_id)}, {literal(job)}, "
                   f"{literal(json.dumps(body))}::jsonb, {literal(json.dumps(metadata))}::jsonb);\n\n")
    return "".join(out)


def count(args: argparse.Namespace, bindir: Path, owner: str | None, database: str, webhooks: int,
          jobs: int, name: str) -> tuple[int, Path]:
    """The instructions of one single-user session over `database`; its callgrind file."""
    args.out.mkdir(parents=True, exist_ok=True)
    sql, out = args.out / f"{name}.sql", args.out / f"{name}.callgrind"
    sql.write_text(script(webhooks, jobs))
    out.unlink(missing_ok=True)
    if owner:
        shutil.chown(args.out, owner)
        shutil.chown(sql, owner)
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            str(bindir / "postgres"), "--single", "-j", "-D", str(args.data_dir),
            "-c", "full_page_writes=off", "-c", "jit=off"]
    if args.config_file:
        argv += ["-c", f"config_file={args.config_file}"]
    with sql.open() as stdin:
        as_owner([*argv, database], owner, stdin=stdin, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]), out
    sys.exit(f"error: no totals in {out}")


# callgrind_annotate's lines: "1,234,567 ( 9.87%)  file:function [object]"
ANNOTATED = re.compile(r"^\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?(\S.*)$")


def inclusive(path: Path) -> dict[str, int]:
    """Each function's inclusive instructions in a callgrind file."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(path)],
                          capture_output=True, text=True, check=True).stdout
    found = {}
    for line in text.splitlines():
        match = ANNOTATED.match(line)
        if match:
            found[match[2]] = int(match[1].replace(",", ""))
    return found


def main() -> None:
    args = parse_args()
    if not shutil.which("valgrind"):
        sys.exit("error: valgrind is needed (Debian: apt-get install -y valgrind)")
    bindir = Path(args.bindir) if args.bindir else find_bindir()
    owner = "postgres" if os.geteuid() == 0 else None
    databases = args.databases.split(",")
    jobs = max(1, (args.warmup + args.appends) // 4)
    per: dict[str, list[float]] = {d: [] for d in databases}
    files: dict[str, tuple[Path, Path]] = {}
    for r in range(args.repeat):
        for database in (databases if r % 2 == 0 else databases[::-1]):
            warm, warm_file = count(args, bindir, owner, database, args.warmup, jobs, f"{database}_warm")
            full, full_file = count(args, bindir, owner, database, args.warmup + args.appends, jobs,
                                    f"{database}_full")
            per[database].append((full - warm) / args.appends)
            files[database] = (warm_file, full_file)
            print(f"  {database}: {warm:,} instructions with {args.warmup} webhooks, {full:,} with "
                  f"{args.warmup + args.appends}: {per[database][-1]:,.0f} per webhook", flush=True)
    first = databases[0]
    base = min(per[first])
    print(f"PostgreSQL {bindir}; {args.appends} webhooks after {args.warmup}, {jobs} new jobs each time")
    for database in databases:
        counts = ", ".join(f"{c:,.0f}" for c in per[database])
        print(f"  {database}: {counts} instructions per webhook; {min(per[database]) / base:.3f}x {first}'s "
              f"(throughput, if CPU-bound alike: {base / min(per[database]):.2f}x)")
    if args.function_diff:
        def per_webhook(database: str) -> dict[str, float]:
            warm, full = (inclusive(f) for f in files[database])
            return {f: (full.get(f, 0) - warm.get(f, 0)) / args.appends for f in set(full) | set(warm)}
        ref = per_webhook(first)
        for database in databases[1:]:
            other = per_webhook(database)
            diff = sorted(((other.get(f, 0) - ref.get(f, 0), f) for f in set(ref) | set(other)),
                          key=lambda d: -abs(d[0]))
            print(f"  where {database} differs from {first} (inclusive instructions per webhook):")
            for d, f in diff[:args.function_diff]:
                print(f"    {d:+12,.0f}  {ref.get(f, 0):12,.0f} -> {other.get(f, 0):12,.0f}  {f}")


if __name__ == "__main__":
    main()
