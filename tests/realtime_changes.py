"""Realtime's Postgres Changes for the local Supabase (tests/realtime_server.py), made from
what the database really does: the WAL of a logical replication slot, decoded with wal2json
as Realtime decodes it (format 2, the supabase_realtime publication's tables as add-tables),
then, per subscriber, what Realtime's realtime.apply_rls makes of each change:

- a binding {event, schema, table, filter} must name a table of the publication and, for a
  filter, one of its columns and an operator Realtime knows; otherwise the channel gets a
  `system` error "Unable to subscribe to changes with given parameters ...";
- columns are the ones the subscriber's role may SELECT (name and typname); record holds
  their values cast with realtime.cast, old_record the replica identity (the primary key);
  a role that may not select the primary key gets errors ["Error 401: Unauthorized"];
- filters (eq, neq, lt, lte, gt, gte, in) compare the new row's value (the old one for a
  DELETE), cast to the column's type;
- with row-level security on the table, an INSERT or UPDATE reaches a subscriber only if the
  row, looked up by its primary key as that user (SET LOCAL ROLE, request.jwt.claims), is
  visible: a user who may not see the row hears nothing. A DELETE is not checked.

Needs wal_level = logical and wal2json: tests/pg15.py's private cluster.
"""

from __future__ import annotations

import json
import re
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from service import db

EVENTS = {"I": "INSERT", "U": "UPDATE", "D": "DELETE"}
OPERATORS = {"eq": "=", "neq": "<>", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
UNABLE = ("Unable to subscribe to changes with given parameters. Please check Realtime is enabled "
          "for the given connect parameters: ")
_FILTER = re.compile(r"(?P<column>[^=]+)=(?P<op>[a-z]+)\.(?P<value>.*)", re.S)
# Realtime's options for its slot (wal2json format 2)
_OPTIONS = ["format-version", "2", "include-pk", "true", "include-transaction", "false",
            "include-timestamp", "true", "include-type-oids", "true", "actions", "insert,update,delete"]


@dataclass(frozen=True)
class Binding:
    """One entry of a join's config.postgres_changes, with the id Realtime gives it."""
    id: int
    event: str
    schema: str
    table: str | None
    filter: str | None

    @classmethod
    def from_join(cls, spec: dict[str, Any]) -> Binding:
        ident = zlib.crc32(json.dumps(spec, sort_keys=True).encode()) % 2**27  # Realtime: phash2
        return cls(ident, spec.get("event", "*"), spec.get("schema", "public"), spec.get("table"),
                   spec.get("filter"))

    def reply(self) -> dict[str, Any]:
        """The binding as the join reply gives it back: as asked, with its id."""
        shown = {"id": self.id, "event": self.event, "schema": self.schema}
        return shown | {k: v for k, v in (("table", self.table), ("filter", self.filter)) if v}

    def parsed(self) -> tuple[str, str, str] | None:
        match = _FILTER.fullmatch(self.filter or "")
        return (match["column"], match["op"], match["value"]) if match else None

    def described(self) -> str:
        column, op, value = self.parsed() or ("", "", "")
        filters = f'[{{"{column}", "{op}", "{value}"}}]' if self.filter else "[]"
        return (f"[event: {self.event}, schema: {self.schema}, table: {self.table or '*'}, "
                f"filters: {filters}, select: nil]")

    def matches(self, change: dict[str, Any]) -> bool:
        return (self.event in ("*", EVENTS[change["action"]]) and self.schema == change["schema"]
                and self.table in (None, "*", change["table"]))


class WalReader:
    """A wal2json slot on the project's database, created now, dropped by close()."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.slot = f"realtime_local_{uuid.uuid4().hex[:12]}"
        self.conn = db.connect(database_url, autocommit=True)     # reads the slot
        self.checks = db.connect(database_url)                     # casts, filters, RLS
        self.conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (self.slot,))

    def close(self) -> None:
        self.conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
        self.conn.close()
        self.checks.close()

    def published(self, conn: psycopg.Connection) -> list[tuple[str, str]]:
        rows = conn.execute("SELECT schemaname, tablename FROM pg_publication_tables "
                            "WHERE pubname = 'supabase_realtime' ORDER BY 1, 2").fetchall()
        return [(r["schemaname"], r["tablename"]) for r in rows]

    def refusal(self, binding: Binding) -> str | None:
        """Why Realtime would not subscribe this binding, or None."""
        with db.connect(self.database_url) as conn:
            tables = self.published(conn)
            if not any(s == binding.schema and binding.table in (None, "*", t) for s, t in tables):
                return UNABLE + binding.described()
            if not binding.filter:
                return None
            column, op, _ = binding.parsed() or ("", "", "")
            known = conn.execute("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                                 "AND attname = %s AND attnum > 0 AND NOT attisdropped",
                                 (f'"{binding.schema}"."{binding.table}"', column)).fetchone()
        if op not in (*OPERATORS, "in"):
            return f"{UNABLE}{binding.described()} Exception: ERROR P0001 (raise_exception) invalid filter"
        if known is None:
            return (f"Unable to subscribe to changes with given parameters. Exception: ERROR P0001 "
                    f"(raise_exception) invalid column for filter {column}")
        return None

    def changes(self) -> list[dict[str, Any]]:
        """The changes decoded since the last call (consumed), of the publication's tables."""
        tables = ",".join(f"{s}.{t}" for s, t in self.published(self.conn))
        options = [*_OPTIONS, "add-tables", tables]
        rows = self.conn.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, "
                                 + ", ".join(["%s"] * len(options)) + ")", [self.slot, *options]).fetchall()
        return [json.loads(r["data"]) for r in rows]

    def message(self, change: dict[str, Any], bindings: list[Binding],
                claims: dict[str, Any]) -> dict[str, Any] | None:
        """The postgres_changes payload one subscriber gets for a change, or None."""
        matched = [b for b in bindings if b.matches(change)]
        if not matched:
            return None
        action, role = EVENTS[change["action"]], claims.get("role") or "anon"
        with self.checks.transaction(force_rollback=True):
            columns = self.selectable(change, role)
            names = {c["name"] for c in columns}
            data = {"schema": change["schema"], "table": change["table"], "type": action}
            if action != "DELETE" and not {p["name"] for p in change["pk"]} <= names:
                refused = data | {"errors": ["Error 401: Unauthorized"]}
                return {"data": refused, "ids": [b.id for b in matched]}
            data |= {"commit_timestamp": self.timestamp(change["timestamp"]), "columns": columns,
                     "errors": None}
            if action != "DELETE":
                data["record"] = self.cast([c for c in change["columns"] if c["name"] in names])
            if action != "INSERT":
                data["old_record"] = self.cast([c for c in change.get("identity", []) if c["name"] in names])
            row = change["columns"] if action != "DELETE" else change.get("identity", [])
            ids = [b.id for b in matched if self.through_filter(b, row)
                   and (action == "DELETE" or self.visible(change, role, claims))]
        return {"data": data, "ids": ids} if ids else None

    def selectable(self, change: dict[str, Any], role: str) -> list[dict[str, str]]:
        rows = self.checks.execute(
            "SELECT a.attname AS name, t.typname AS type FROM pg_attribute a "
            "JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped "
            "AND has_column_privilege(%s, a.attrelid, a.attname, 'SELECT') ORDER BY a.attnum",
            (f'"{change["schema"]}"."{change["table"]}"', role)).fetchall()
        return [dict(r) for r in rows]

    def timestamp(self, value: str) -> str:
        return self.checks.execute("""SELECT to_char(%s::timestamptz AT TIME ZONE 'utc',
            'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS t""", (value,)).fetchone()["t"]

    def cast(self, columns: list[dict[str, Any]]) -> dict[str, Any]:
        """Each WAL value as Realtime sends it: realtime.cast(value, its type) (jsonb)."""
        row = self.checks.execute(
            "SELECT coalesce(jsonb_object_agg(c->>'name', realtime.cast(c->>'value', "
            "(c->>'typeoid')::oid::regtype)), '{}') AS record FROM jsonb_array_elements(%s) c",
            (Jsonb(columns),)).fetchone()
        return row["record"]

    def through_filter(self, binding: Binding, row: list[dict[str, Any]]) -> bool:
        if not binding.filter:
            return True
        column, op, value = binding.parsed() or ("", "", "")
        [found] = [c for c in row if c["name"] == column] or [None]
        if found is None or found["value"] is None:
            return False
        kind = sql.SQL(self.checks.execute("SELECT %s::oid::regtype::text AS t",
                                           (found["typeoid"],)).fetchone()["t"])
        if op == "in":
            query = sql.SQL("SELECT %s::{0} = ANY(%s::{0}[]) AS ok").format(kind)
            value = "{" + value.strip("()") + "}"
        else:
            query = sql.SQL("SELECT %s::{0} {1} %s::{0} AS ok").format(kind, sql.SQL(OPERATORS[op]))
        return bool(self.checks.execute(query, (str(found["value"]), value)).fetchone()["ok"])

    def visible(self, change: dict[str, Any], role: str, claims: dict[str, Any]) -> bool:
        """As realtime.apply_rls: may this user SELECT the row, by primary key, under RLS?"""
        table = sql.Identifier(change["schema"], change["table"])
        keys = {c["name"]: c for c in change["columns"]}
        pk = change["pk"]
        where = sql.SQL(" AND ").join(
            sql.SQL("{} = %s::{}").format(sql.Identifier(p["name"]), sql.SQL(p["type"])) for p in pk)
        with self.checks.transaction(force_rollback=True):
            self.checks.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            self.checks.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
            query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {}) AS ok").format(table, where)
            values = [str(keys[p["name"]]["value"]) for p in change["pk"]]
            return self.checks.execute(query, values).fetchone()["ok"]
