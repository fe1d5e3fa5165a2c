"""What a Supabase project has before our migrations run, rebuilt on a plain PostgreSQL.

Supabase is the outside world here, so it is the part that is played: its roles (anon,
authenticated, service_role with BYPASSRLS, the authenticator login PostgREST uses), a
non-superuser `postgres`-like owner that applies the migrations, `auth.uid()` /
`auth.jwt()` reading `request.jwt.claims` as Supabase's do, the `supabase_realtime`
publication (already holding another table of the project), the `realtime` schema with
`realtime.topic()`, `realtime.messages`, a `broadcast_changes` that records its calls and the
`realtime.cast` Postgres Changes uses, and the default privileges older projects have
(everything on new tables to the API roles). The project's migrations are then applied
unchanged, by that owner.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg

from service import db, migrations

OWNER = "rjs_supabase_owner"  # plays Supabase's `postgres`: CREATEROLE, not a superuser
API_ROLES = ("anon", "authenticated", "service_role")
_LOCK = 7_215_009  # serialises the role bootstrap of concurrent test sessions on one server

# Roles are per server, shared by every test session using it: created once, by whichever
# session comes first, under an advisory lock in the maintenance database.
_ROLES = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'service_role') THEN
        CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticator') THEN
        CREATE ROLE authenticator LOGIN NOINHERIT;
        GRANT anon, authenticated, service_role TO authenticator;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{OWNER}') THEN
        CREATE ROLE {OWNER} NOLOGIN CREATEROLE NOSUPERUSER;
    END IF;
END $$;
"""

# Per database, as the superuser (Supabase's own admin), before the migrations.
_DATABASE = f"""
CREATE SCHEMA auth;
CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('request.jwt.claim', true), ''),
                    nullif(current_setting('request.jwt.claims', true), ''))::jsonb $$;
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                    nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')::uuid $$;
CREATE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('request.jwt.claim.role', true), ''),
                    nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role') $$;
GRANT USAGE ON SCHEMA auth TO {OWNER}, anon, authenticated, service_role;

CREATE TABLE public.other_app_table (id integer PRIMARY KEY);  -- someone else's realtime table
ALTER TABLE public.other_app_table OWNER TO {OWNER};
GRANT ALL ON public.other_app_table TO anon, authenticated, service_role;  -- as its project wants
CREATE PUBLICATION supabase_realtime FOR TABLE public.other_app_table;
ALTER PUBLICATION supabase_realtime OWNER TO {OWNER};

CREATE SCHEMA realtime;
GRANT USAGE ON SCHEMA realtime TO {OWNER}, anon, authenticated, service_role;
CREATE TABLE realtime.messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic text NOT NULL, extension text NOT NULL, event text, payload jsonb,
    private boolean NOT NULL DEFAULT true
);
ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
ALTER TABLE realtime.messages OWNER TO {OWNER};
GRANT SELECT ON realtime.messages TO authenticated;
CREATE FUNCTION realtime.topic() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('realtime.topic', true), '')::text $$;
-- The real one inserts a message for the topic (as below); this one also keeps its arguments.
CREATE TABLE realtime.broadcast_calls (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic_name text, event_name text, operation text, table_name text, table_schema text,
    new jsonb, old jsonb, level text
);
GRANT INSERT ON realtime.broadcast_calls, realtime.messages TO {OWNER};
CREATE FUNCTION realtime.broadcast_changes(
    topic_name text, event_name text, operation text, table_name text, table_schema text,
    new record, old record, level text DEFAULT 'ROW'
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO realtime.broadcast_calls
        (topic_name, event_name, operation, table_name, table_schema, new, old, level)
    VALUES (topic_name, event_name, operation, table_name, table_schema,
            to_jsonb(new), to_jsonb(old), level);
    -- as Supabase's: the payload realtime.send stores, a private broadcast message
    INSERT INTO realtime.messages (topic, extension, event, payload, private)
    VALUES (topic_name, 'broadcast', event_name,
            jsonb_build_object('old_record', to_jsonb(old), 'record', to_jsonb(new),
                               'operation', operation, 'table', table_name, 'schema', table_schema),
            true);
END $$;

-- As Supabase's: Realtime's Postgres Changes cast each WAL value to jsonb with it.
CREATE FUNCTION realtime.cast(val text, type_ regtype) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    res jsonb;
BEGIN
    EXECUTE format('SELECT to_jsonb(%L::%s)', val, type_) INTO res;
    RETURN res;
END $$;

-- What older projects do: every table the owner creates is granted to the API roles.
ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER} IN SCHEMA public
    GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER} IN SCHEMA public
    GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
"""


def bootstrap_roles(server_url: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(%s)", (_LOCK,))
        try:
            admin.execute(_ROLES)
        finally:
            admin.execute("SELECT pg_advisory_unlock(%s)", (_LOCK,))


def create_project(server_url: str, database_url: str, name: str,
                   apply: Callable[[psycopg.Connection], object] = migrations.migrate) -> None:
    """A new database `name` laid out like a Supabase project, migrated by its owner
    (with the service's migrate command unless `apply` says otherwise)."""
    bootstrap_roles(server_url)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" OWNER {OWNER}')
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_DATABASE)
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute(f"SET ROLE {OWNER}")
        apply(conn)


@contextmanager
def acting_as(conn: psycopg.Connection, role: str, claims: dict | None = None) -> Iterator[None]:
    """Run as PostgREST runs a request: in a transaction, `SET LOCAL ROLE` and the JWT's
    claims in request.jwt.claims. Rolled back at the end."""
    with conn.transaction(force_rollback=True):
        conn.execute(f"SET LOCAL ROLE {role}")
        conn.execute("SELECT set_config('request.jwt.claims', %s, true)",
                     (json.dumps(claims or {"role": role}),))
        yield


def user_claims(user_id: str) -> dict:
    return {"sub": user_id, "role": "authenticated", "aud": "authenticated"}
