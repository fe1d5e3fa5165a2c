"""A replay's scratch tables: the projections rebuilt in its own session, compared with the
live ones, and the rows that differ written to them (service/replay.py runs the stages).

The scratch tables are temporary tables named like the projections. PostgreSQL looks in a
session's temporary schema first, so in the replay's session the rebuild functions
(sql/rebuild.sql) write into them and the step rollups the jobs are derived from read them,
with the very SQL the live service runs. Live tables are always named with their schema
here. The keys of the rows that differ are kept in replay_diff_<table>, with their stream
and the change that writes them (i: insert, u: update, d: delete): the live rows of a stream
change only through appends, so what was listed holds until one of its events arrives, and
then its entries are listed again.

Over a live projection, the copy keeps a digest of each prediction's log tail, not the tail
(Table.digests); the comparison digests the live tails alike, and a row that is written or
shown gets its tail back from the event that has it (Table.restore, restore_ahead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import psycopg
from psycopg import sql


class Table(NamedTuple):
    keys: tuple[str, ...]
    rows_of: str  # its rows of some streams, {0} being the streams (a text[])
    stream: str  # the stream a row belongs to, {0} and {1} being the two sides compared
    order: str = ""  # the order new rows are written in (n: the rebuilt rows), if any
    carry: tuple[str, ...] = ()  # the columns besides keys that `stream` reads
    # looked up through a hash index on its first key (text) rather than a btree on its keys
    # (Scratch.index says why)
    hashed: bool = False
    # columns a scratch copy made over a live projection holds as their scratch_digest
    # (sql/rebuild.sql says why), and the lateral subquery over a scratch row n that gives
    # their values back, where a row is written or shown
    digests: tuple[str, ...] = ()
    restore: str = ""


# The log tail the event at a position ({0}) keeps, as the fold reads it.
_EVENT_TAIL = """
    SELECT f.logs_tail FROM events e
    CROSS JOIN LATERAL prediction_facts(e.stream, e.type, e.data, e.metadata, e.position, e.recorded_at) f
    WHERE e.position = {0}"""

TABLES: dict[str, Table] = {
    # new jobs written in the order of its created_at indexes (why: above rebuild_jobs in sql/rebuild.sql)
    "jobs": Table(("id",), "id = ANY (stream_job_ids({0}))", "coalesce({0}.id, {1}.id)::text",
                  "n.created_at DESC, n.id DESC"),
    "predictions": Table(
        ("id",), "job_id = ANY (stream_job_ids({0})) OR (job_id IS NULL AND id = ANY ({0}))",
        "coalesce({1}.job_id::text, {0}.job_id::text, {1}.id, {0}.id)", carry=("job_id",), hashed=True,
        digests=("logs_tail",), restore=f"""
            SELECT k.logs_tail FROM pg_temp.replay_logs k WHERE k.position = fold_key_position(n.logs_key)
            UNION ALL
            ({_EVENT_TAIL.format("fold_key_position(n.logs_key)")})
            LIMIT 1"""),
    "outputs": Table(
        ("prediction_id", "index"),
        "job_id = ANY (stream_job_ids({0})) OR (job_id IS NULL AND prediction_id = ANY ({0}))",
        "coalesce({1}.job_id::text, {0}.job_id::text, {1}.prediction_id, {0}.prediction_id)",
        carry=("job_id",), hashed=True),
    "job_activity": Table(("job_id",), "job_id = ANY (stream_job_ids({0}))",
                          "coalesce({0}.job_id, {1}.job_id)::text"),
}
SAMPLE = 20
# maintenance_work_mem while a scratch table's hash index is built. PostgreSQL sorts the
# entries by bucket before writing them when the index starts with at least as many buckets
# as this many pages (or as temp_buffers has): 512 buckets, about 157,000 keys (307 a
# bucket). It is also the sort's memory: at 20M events the 3.9M entries' sort goes to a
# file of 75 MB, and is still faster than inserting them unsorted (Scratch.index).
HASH_BUILD_MEMORY = "4MB"
# The log tails of the predictions listed to be written, read again from their events ahead
# of the cut-over (Scratch.restore_ahead), in position order; by position: an event's tail
# never changes, whatever is rebuilt after.
RESTORE_AHEAD = f"""
    INSERT INTO pg_temp.replay_logs
    SELECT p.position, f.logs_tail
    FROM (SELECT DISTINCT fold_key_position(n.logs_key) AS position
          FROM pg_temp.replay_diff_predictions d JOIN pg_temp.predictions n ON n.id = d.id
          WHERE d.change <> 'd' AND fold_key_position(n.logs_key) IS NOT NULL
          ORDER BY 1) p
    CROSS JOIN LATERAL ({_EVENT_TAIL.format("p.position")} OFFSET 0) f
    ON CONFLICT DO NOTHING"""


@dataclass
class Difference:
    table: str
    key: tuple
    kind: str  # missing (live has it, rebuild does not), extra, or changed
    columns: list[str] | None = None

    def __str__(self) -> str:
        what = f" ({', '.join(self.columns)})" if self.columns else ""
        return f"{self.table} {'/'.join(map(str, self.key))}: {self.kind}{what}"


def _names(keys: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, keys))


def _on(keys: tuple[str, ...], a: str, b: str) -> sql.Composable:
    return sql.SQL(" AND ").join(sql.SQL("{}.{} = {}.{}").format(
        sql.Identifier(a), sql.Identifier(k), sql.Identifier(b), sql.Identifier(k)) for k in keys)


def _temp(name: str) -> sql.Composable:
    return sql.SQL("pg_temp.{}").format(sql.Identifier(name))


def _diff(table: str) -> sql.Composable:
    return _temp(f"replay_diff_{table}")


@dataclass
class Scratch:
    conn: psycopg.Connection
    schema: str  # the live tables'
    # each table's columns, and the session's search_path, read once by create()
    columns: dict[str, list[str]] = field(default_factory=dict)
    search_path: str = ""
    # the copy holds the tables' digests (Table.digests), read by create()
    digesting: bool = False

    def create(self) -> None:
        """Empty tables shaped like the projections, without indexes (built after the rows)."""
        self.search_path = self.conn.execute("SELECT current_setting('search_path') AS p").fetchone()["p"]
        for table in TABLES:
            self.conn.execute(sql.SQL("CREATE TEMP TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
                sql.Identifier(table), sql.Identifier(self.schema, table)))
            self.columns[table] = [r["attname"] for r in self.conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                "AND NOT attisdropped ORDER BY attnum", (f"pg_temp.{table}",))]
        # Over a live projection, which a replay mostly finds equal, the copy keeps digests
        # (the rebuild writes them until drop()); into an empty one, every row is written
        # whole, its long texts as well, so the copy keeps them whole.
        self.digesting = self.conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {}) AS e").format(
            sql.Identifier(self.schema, "predictions"))).fetchone()["e"]
        if self.digesting:
            self.conn.execute("SET rjs.rebuild_logs = 'digest'")

    def index(self) -> None:
        """Keys, a job's rows, and statistics: catching up a few jobs, in the cut-over
        above all, plans its reads of the scratch tables from them (rebuild_jobs for 30
        jobs of a million events: 354 ms without statistics, 5 ms with).

        The text keys (a prediction's id, an output's) get a hash index, not a btree: a
        btree sorts them in the database's collation (strcoll, with no abbreviated keys in
        PostgreSQL 15 for a libc collation): at 20M events the predictions' 3.9M ids took
        26-29 s as a btree, 18-20 s as a hash index (most of it the first read of the
        7.3 GB table; the job_id index after it, 5 s). A hash index compares no strings
        (787,520 ids: 3.4-3.7 s btree, 2.1-2.3 s hash). The scratch tables are looked up
        by key, never range-read, and nothing relies on their keys being unique: the
        rebuild makes one row a key (GROUP BY, DISTINCT ON), and nothing writes them with
        ON CONFLICT.

        A hash index is built with its entries sorted by bucket first (HASH_BUILD_MEMORY
        says how). Inserted in the table's order instead, each lands on a random page of
        the index, which at 20M events (3.9M ids, a 134 MB index) no longer fits in the
        CPU's caches: 6.1-9.1 s against 3.6-4.6 s sorted, on the 20M store's predictions
        (six builds unsorted, seven sorted with 4-100 MB); at 1M events (201,505 ids)
        113-136 ms unsorted, 127-219 ms sorted (three builds)."""
        self.conn.execute("SET default_statistics_target = 10")  # a small sample is enough
        # The uuid keys of a large store's projection sorted in memory, as the rebuild's
        # work_mem. (A prediction key took ~94 bytes in the sort, trace_sort: 256MB holds
        # 2.7M. 512MB, which held a 20M-event store's 3.9M of them, left the indexes stage
        # where it was at 20M: kept at 256MB, for smaller servers.)
        self.conn.execute("SET maintenance_work_mem = '256MB'")
        for table, spec in TABLES.items():
            if spec.hashed:
                with self.conn.transaction():  # HASH_BUILD_MEMORY for this build alone
                    self.conn.execute(f"SET LOCAL maintenance_work_mem = '{HASH_BUILD_MEMORY}'")
                    self.conn.execute(sql.SQL("CREATE INDEX ON {} USING hash ({})").format(
                        _temp(table), sql.Identifier(spec.keys[0])))
            else:
                self.conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                    _temp(table), _names(spec.keys)))
            if table in ("predictions", "outputs"):
                self.conn.execute(sql.SQL("CREATE INDEX ON {} (job_id)").format(_temp(table)))
            self.conn.execute(sql.SQL("ANALYZE {}").format(_temp(table)))
            self.conn.execute(sql.SQL(
                "CREATE TEMP TABLE {} AS SELECT {}, ''::text AS stream, ''::\"char\" AS change "
                "FROM {} LIMIT 0").format(
                sql.Identifier(f"replay_diff_{table}"), _names(spec.keys), _temp(table)))
        if self.digesting:
            self.conn.execute("CREATE TEMP TABLE replay_logs (position bigint PRIMARY KEY, logs_tail text)")
        self.conn.execute("RESET default_statistics_target")
        self.conn.execute("RESET maintenance_work_mem")

    def drop(self) -> None:
        if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self.conn.execute("ROLLBACK")
        for table in TABLES:
            self.conn.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(_temp(table), _diff(table)))
        self.conn.execute("DROP TABLE IF EXISTS pg_temp.replay_logs")
        self.conn.execute("RESET rjs.rebuild_logs")

    def count(self, table: str) -> int:
        return self.conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(_temp(table))).fetchone()["n"]

    def _rows(self, table: str, live: bool, streams: list[str] | None) -> sql.Composable:
        """The rows of a live or scratch table that belong to `streams` (None: all), a live
        row's digested columns as their digests, as the scratch copy holds them."""
        spec = TABLES[table]
        name = sql.Identifier(self.schema, table) if live else _temp(table)
        where = sql.SQL("true") if streams is None else sql.SQL(spec.rows_of.format("{s}")).format(
            s=sql.SQL("{}::text[]").format(sql.Literal(streams)))
        digests = self._digests(table)
        columns = sql.SQL("*") if not (live and digests) else sql.SQL(", ").join(
            sql.SQL("scratch_digest({0}) AS {0}" if c in digests else "{0}").format(sql.Identifier(c))
            for c in self.columns[table])
        return sql.SQL("(SELECT {} FROM {} WHERE {})").format(columns, name, where)

    def _digests(self, table: str) -> tuple[str, ...]:
        """The columns of a table that this copy holds as digests."""
        return TABLES[table].digests if self.digesting else ()

    def _restored(self, table: str) -> sql.Composable:
        """The join that gives a scratch row n's digested columns back, as r (or none)."""
        return sql.SQL("LEFT JOIN LATERAL ({}) r ON true").format(sql.SQL(TABLES[table].restore)) \
            if self._digests(table) else sql.SQL("")

    def clear_differences(self) -> None:
        for table in TABLES:
            self.conn.execute(sql.SQL("TRUNCATE {}").format(_diff(table)))

    def _hashed(self, table: str, live: bool, streams: list[str] | None) -> sql.Composable:
        """The keys of a live or scratch table's rows of `streams`, the columns its stream
        is read from, and a 64-bit hash of each whole row (a dropped column of the live
        table counts in none)."""
        spec = TABLES[table]
        return sql.SQL("(SELECT {cols}, hash_record_extended(r, 0) AS row_hash FROM {rows} r)").format(
            cols=_names(spec.keys + spec.carry), rows=self._rows(table, live, streams))

    def list_differences(self, streams: list[str] | None) -> None:
        """List the keys of the rows of `streams` (None: all) whose live and rebuilt versions
        differ, or exist on one side only, in place of what was listed for them before.

        The two sides are joined by key with a hash of each row, not the rows themselves:
        joined whole, at 20M events the hash join wrote both copies of the projections to
        temporary files and read them back (19 GB; at 1M they stay in the page cache). Two
        rows that differ have the same 64-bit hash with a chance of one in 2^64."""
        if streams is not None:
            self.forget(streams)
        # the keys and hashes of a large store's rows hashed in memory
        self.conn.execute("SELECT set_config('work_mem', '256MB', true)")
        for table, spec in TABLES.items():
            keys = spec.keys
            self.conn.execute(sql.SQL("""
                INSERT INTO {diff}
                SELECT {cols}, {stream},
                       CASE WHEN o.{k} IS NULL THEN 'i' WHEN n.{k} IS NULL THEN 'd' ELSE 'u' END
                FROM {live} o FULL JOIN {new} n ON {on}
                WHERE o.{k} IS NULL OR n.{k} IS NULL OR o.row_hash <> n.row_hash""").format(
                diff=_diff(table), on=_on(keys, "o", "n"), stream=sql.SQL(spec.stream.format("o", "n")),
                cols=sql.SQL(", ").join(sql.SQL("coalesce(o.{0}, n.{0})").format(sql.Identifier(k))
                                        for k in keys),
                live=self._hashed(table, True, streams), new=self._hashed(table, False, streams),
                k=sql.Identifier(keys[0])))
        if streams is None:  # all listed: by stream from here on (cut-over, batches); hashed
            # for the reason index() gives (after a change of the rules every row is listed)
            for table in TABLES:
                self.conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING hash (stream)").format(
                    sql.Identifier(f"replay_diff_{table}_stream"), _diff(table)))

    def differences(self) -> tuple[int, list[Difference]]:
        """How many rows differ, and the first SAMPLE of them described."""
        total, samples = 0, []
        for table, spec in TABLES.items():
            keys = spec.keys
            total += self.conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(_diff(table))
                                       ).fetchone()["n"]
            rows = self.conn.execute(sql.SQL("""
                SELECT to_jsonb(o) AS old, {new_row} AS new
                FROM (SELECT {keys} FROM {diff} ORDER BY {keys} LIMIT {limit}) d
                LEFT JOIN {live} o ON {on_o}
                LEFT JOIN {new} n ON {on_n} {restored}""").format(
                keys=_names(keys), diff=_diff(table), live=sql.Identifier(self.schema, table),
                new=_temp(table), on_o=_on(keys, "o", "d"), on_n=_on(keys, "n", "d"),
                new_row=sql.SQL("to_jsonb(n) || coalesce(to_jsonb(r), '{}')" if self._digests(table)
                                else "to_jsonb(n)"),
                restored=self._restored(table), limit=sql.Literal(max(SAMPLE - len(samples), 0)))).fetchall()
            samples += [_describe(table, keys, r["old"], r["new"]) for r in rows]
        return total, samples

    def restore_ahead(self) -> None:
        """Read again the log tails behind the digests of every prediction listed to be
        written (after a change of the fold's rules, every one), ahead of the cut-over, which
        then finds them in replay_logs rather than in the events, with appends waiting (at
        1M events, 196,080 predictions listed: a cut-over of 9.0-10.0 s, as when the copy
        kept the tails whole, 7.9-9.1 s; 13.6-16.7 s without this, on a busier machine).
        Compressed here with lz4 where the server has it, as rebuild_predictions compresses
        the tails it keeps whole: a value is written into the live table as compressed as it
        comes, where one uncompressed would be compressed with the default pglz there,
        appends waiting (+6 s at 1M)."""
        if self.digesting:
            with self.conn.transaction():
                self.conn.execute("SELECT prefer_lz4_compression()")
                self.conn.execute(RESTORE_AHEAD)

    def streams_differing(self) -> list[str]:
        """The streams with rows listed as differing, in order."""
        listed = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT stream FROM {}").format(_diff(t)) for t in TABLES)
        return [r["stream"] for r in self.conn.execute(sql.SQL(
            "SELECT stream FROM ({}) s GROUP BY stream ORDER BY stream").format(listed))]

    def forget(self, streams: list[str]) -> None:
        """Drop the listed differences of these streams (written)."""
        for table in TABLES:
            self.conn.execute(sql.SQL("DELETE FROM {} WHERE stream = ANY (%s::text[])").format(_diff(table)),
                              (streams,))

    def live_names_first(self) -> None:
        """Until the transaction ends, unqualified names are the live tables again, for the
        triggers that writing them fires."""
        self.conn.execute(sql.SQL("SET LOCAL search_path = {}, pg_temp").format(sql.SQL(self.search_path)))

    def apply(self, streams: list[str] | None = None) -> int:
        """Write the listed rows (of `streams` only, if given) that differ into the live
        tables; return how many were inserted, updated or deleted."""
        return sum(self._apply(table, spec, streams) for table, spec in TABLES.items())

    def _apply(self, table: str, spec: Table, streams: list[str] | None) -> int:
        keys, columns = spec.keys, self.columns[table]
        only = sql.SQL("true") if streams is None else sql.SQL("d.stream = ANY ({}::text[])").format(
            sql.Literal(streams))
        names = {"live": sql.Identifier(self.schema, table), "new": _temp(table), "diff": _diff(table),
                 "only": only, "on_ld": _on(keys, "l", "d"), "on_nd": _on(keys, "n", "d"),
                 "cols": _names(tuple(columns)),
                 "new_cols": sql.SQL(", ").join(sql.SQL("{}.{}").format(
                     sql.Identifier("r" if c in self._digests(table) else "n"), sql.Identifier(c))
                     for c in columns),
                 "restored": self._restored(table),
                 "order": sql.SQL(f"ORDER BY {spec.order}" if spec.order else "")}
        deleted = self.conn.execute(sql.SQL("""
            DELETE FROM {live} l USING {diff} d
            WHERE d.change = 'd' AND {only} AND {on_ld}""").format(**names)).rowcount
        updated = self.conn.execute(sql.SQL("""
            UPDATE {live} l SET ({cols}) = ROW({new_cols})
            FROM {diff} d JOIN {new} n ON {on_nd} {restored}
            WHERE d.change = 'u' AND {only} AND {on_ld}""").format(**names)).rowcount
        inserted = self.conn.execute(sql.SQL("""
            INSERT INTO {live} ({cols})
            SELECT {new_cols} FROM {diff} d JOIN {new} n ON {on_nd} {restored}
            WHERE d.change = 'i' AND {only} {order}""").format(**names)).rowcount
        return deleted + updated + inserted


def _describe(table: str, keys: tuple[str, ...], old: dict | None, new: dict | None) -> Difference:
    key = tuple((old or new)[k] for k in keys)
    if new is None:
        return Difference(table, key, "missing from rebuild")
    if old is None:
        return Difference(table, key, "only in rebuild")
    return Difference(table, key, "changed", [c for c in old if old[c] != new.get(c)])
