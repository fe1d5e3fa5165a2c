-- The event store: events is append-only, and every event is recorded through append_event,
-- which folds it into the projections (sql/fold.sql) in the same transaction.
--
-- Re-applied as a whole by `flask --app service migrate` whenever this file changes (see
-- docs/sql.md): every statement here must be safe to run again.


-- Immutability ------------------------------------------------------------------------------
-- Enforced here, for every role including the owner, not by convention.
CREATE OR REPLACE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege', HINT = 'record a new event instead';
END $$;

CREATE OR REPLACE TRIGGER events_no_update_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();

CREATE OR REPLACE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- Application roles may read and append, nothing else. app_user (migration 001) is the
-- role the service's own login is meant to be a member of when it is not the owner.
REVOKE ALL ON events FROM PUBLIC;
REVOKE ALL ON events FROM app_user;
GRANT SELECT, INSERT ON events TO app_user;
-- The idempotency keys (migration 017) are as append-only as the events they name.
CREATE OR REPLACE TRIGGER event_keys_no_update_delete
    BEFORE UPDATE OR DELETE ON event_keys
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
CREATE OR REPLACE TRIGGER event_keys_no_truncate
    BEFORE TRUNCATE ON event_keys
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
REVOKE ALL ON event_keys FROM PUBLIC;
REVOKE ALL ON event_keys FROM app_user;
GRANT SELECT, INSERT ON event_keys TO app_user;
GRANT USAGE ON SEQUENCE events_position_seq TO app_user;
-- The delivery log (migration 018): appended with the events; only retention drops it.
REVOKE ALL ON deliveries FROM PUBLIC;
REVOKE ALL ON deliveries FROM app_user;
GRANT SELECT, INSERT ON deliveries TO app_user;

-- Row-level security is on for every table (migration 009): app_user reads and appends
-- events, as its privileges say. No other policy touches events (service_role bypasses
-- RLS; sql/supabase_security.sql grants it read and append).
DROP POLICY IF EXISTS events_app_user_select ON events;
CREATE POLICY events_app_user_select ON events FOR SELECT TO app_user USING (true);
DROP POLICY IF EXISTS events_app_user_insert ON events;
CREATE POLICY events_app_user_insert ON events FOR INSERT TO app_user WITH CHECK (true);
DROP POLICY IF EXISTS event_keys_app_user_select ON event_keys;
CREATE POLICY event_keys_app_user_select ON event_keys FOR SELECT TO app_user USING (true);
DROP POLICY IF EXISTS event_keys_app_user_insert ON event_keys;
CREATE POLICY event_keys_app_user_insert ON event_keys FOR INSERT TO app_user WITH CHECK (true);
DROP POLICY IF EXISTS deliveries_app_user_select ON deliveries;
CREATE POLICY deliveries_app_user_select ON deliveries FOR SELECT TO app_user USING (true);
DROP POLICY IF EXISTS deliveries_app_user_insert ON deliveries;
CREATE POLICY deliveries_app_user_insert ON deliveries FOR INSERT TO app_user WITH CHECK (true);


-- Append -------------------------------------------------------------------------------------
-- Record one event and fold it into the projections, in the caller's transaction.
-- Idempotent by event_key, forever: the key is recorded in event_keys first, with the
-- position the event will have, and a key already there records nothing, changes nothing,
-- and returns the original event's position with duplicate = true, wherever (in whichever
-- partition) that event is. A second append of a key not yet committed waits for the first
-- to end, as a unique index makes it. Appends to one stream are serialised (advisory
-- lock), so a job's derived counts never miss a concurrent event; a full replay holds a
-- SHARE lock on events, so appends wait for it to commit.
CREATE OR REPLACE FUNCTION append_event(
    p_event_key text, p_stream text, p_type text, p_data jsonb, p_metadata jsonb DEFAULT '{}'
) RETURNS TABLE (event_position bigint, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    e events;
    v_position bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_stream, 0));
    INSERT INTO event_keys (event_key, position)
    VALUES (p_event_key, nextval('events_position_seq'))
    ON CONFLICT (event_key) DO NOTHING
    RETURNING position INTO v_position;
    IF v_position IS NULL THEN
        SELECT k.position INTO event_position FROM event_keys k WHERE k.event_key = p_event_key;
        IF FOUND THEN
            duplicate := true;
            RETURN NEXT;
        END IF;
        RETURN;
    END IF;
    INSERT INTO events (position, event_key, stream, type, data, metadata)
    OVERRIDING SYSTEM VALUE
    VALUES (v_position, p_event_key, p_stream, p_type, p_data, coalesce(p_metadata, '{}'::jsonb))
    RETURNING * INTO e;
    PERFORM apply_event(e);
    event_position := e.position;
    duplicate := false;
    RETURN NEXT;
END $$;


-- Partitions ---------------------------------------------------------------------------------
-- events is range-partitioned by position (migration 017): partition n, named
-- store_partitions.events_<n, six digits>, holds positions [n * size, (n + 1) * size).
-- The size of the partitions created from now on; those already made keep theirs.
CREATE OR REPLACE FUNCTION event_partition_size() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1000000::bigint $$;

-- The partitions of events, in position order, with their bounds and size on disk (table,
-- TOAST and indexes). The default partition has NULL bounds and comes last.
CREATE OR REPLACE VIEW event_partitions AS
SELECT c.oid::regclass::text AS partition,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''?(\d+)''?\)'))[1]::bigint AS from_position,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''?(\d+)''?\)'))[1]::bigint AS to_position,
       pg_total_relation_size(c.oid) AS bytes
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'events'::regclass
ORDER BY from_position NULLS LAST;

-- The least position a stream's events can have: its job.created's (every other event of a
-- job is appended after the job exists), found by its key (service/commands.py:
-- created:<job>); 0 for a stream that is no job's. A read of one job's events bounded
-- below by it skips the older partitions, so it costs the same at any size of the store.
-- PL/pgSQL, as job_last_position: as a SQL function (its subquery keeps it from being
-- inlined) it was planned again at every call, ~57 us, and the fold's probes call it at
-- every webhook (pg_stat_statements: 615 plans in 600 webhooks).
CREATE OR REPLACE FUNCTION job_first_position(p_stream text) RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    RETURN coalesce((SELECT k.position FROM event_keys k WHERE k.event_key = 'created:' || p_stream), 0);
END $$;

-- The greatest position a job's events can have: its job_activity row's last_position.
-- touch_job (sql/fold.sql) writes it in the transaction of every event of a job stream, so
-- in any one snapshot no event of the job lies beyond it (the rebuild writes it from the
-- same events). With job_first_position it bounds a read of one job's events on both
-- sides, so the read touches only the partitions that hold them: without the upper bound,
-- an old job's read probed every later partition's index. The greatest bigint (no bound)
-- for a stream that is no job's, which has no job_activity row. PL/pgSQL: a SQL function
-- whose body reads a table is planned again at each call.
CREATE OR REPLACE FUNCTION job_last_position(p_stream text) RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    RETURN coalesce((SELECT a.last_position FROM job_activity a
                     WHERE a.job_id = stream_job_id(p_stream)), 9223372036854775807);
END $$;

-- Rows the default partition caught (appended past the last partition while the upkeep had
-- not run) are moved out by both keepers of the partitions alike: detach_caught_events takes
-- the default partition out of events (ACCESS EXCLUSIVE on events, to the end of the
-- transaction) and puts an empty one in its place, with the same name and schema; once the
-- partitions they need exist, restore_caught_events copies them back in position order and
-- drops the detached table. Their positions and keys do not change (event_keys still points
-- at them). detach_caught_events returns NULLs when the default partition holds nothing.
CREATE OR REPLACE FUNCTION events_default_partition() RETURNS regclass
LANGUAGE sql STABLE AS $$
    SELECT c.oid::regclass FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'events'::regclass AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'
$$;

CREATE OR REPLACE FUNCTION detach_caught_events(OUT moving regclass, OUT newest bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_default regclass := events_default_partition();
    v_nsp text;
    v_name text;
    v_caught boolean := false;
BEGIN
    IF v_default IS NOT NULL THEN
        EXECUTE format('SELECT EXISTS (SELECT FROM %s)', v_default) INTO v_caught;
    END IF;
    IF NOT v_caught THEN
        RETURN;
    END IF;
    SELECT c.relnamespace::regnamespace::text, c.relname::text INTO v_nsp, v_name
    FROM pg_class c WHERE c.oid = v_default;
    LOCK TABLE events IN ACCESS EXCLUSIVE MODE;
    EXECUTE format('ALTER TABLE events DETACH PARTITION %s', v_default);
    EXECUTE format('ALTER TABLE %s RENAME TO events_default_moving', v_default);
    EXECUTE format('CREATE TABLE %I.%I PARTITION OF events DEFAULT', v_nsp, v_name);
    moving := v_default;  -- the same table, renamed
    EXECUTE format('SELECT max(position) FROM %s', moving) INTO newest;
END $$;

CREATE OR REPLACE FUNCTION restore_caught_events(p_moving regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_moved bigint;
BEGIN
    IF p_moving IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('INSERT INTO events (position, event_key, stream, type, data, metadata, recorded_at) '
                   'OVERRIDING SYSTEM VALUE '
                   'SELECT position, event_key, stream, type, data, metadata, recorded_at '
                   'FROM %s ORDER BY position', p_moving);
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    EXECUTE format('DROP TABLE %s', p_moving);
    RAISE NOTICE 'moved % events out of the default partition', v_moved;
END $$;

-- pg_partman -------------------------------------------------------------------------------
-- Where the server has pg_partman (pg_available_extensions), it can keep events' partitions
-- instead of the loop in maintain_event_partitions: `flask --app service migrate` hands them
-- to it (EVENT_PARTITIONS=auto, the default, or partman; service/migrations.py calls
-- manage_event_partitions) and hands them back with EVENT_PARTITIONS=builtin. Either way
-- maintain_event_partitions is what runs the upkeep (the worker, or pg_cron): pg_partman's
-- own background worker is not needed, and events is registered with automatic maintenance
-- off, so a run_maintenance() of every partman table (pg_partman's background worker, a
-- pg_cron job of another of the project's tables) leaves events alone.
--
-- pg_partman names a partition <table>_p<first position> (events_p3000000) and keeps it in
-- the schema of its parent, public: there, unlike in store_partitions, the Supabase API
-- could reach it, and a newer Supabase project grants every new table in public to anon.
-- secure_event_partitions takes every privilege off each partition and turns row-level
-- security on (with no policy, only the owner reads one directly); every read and append
-- goes through events, as before. The partitions' positions are the same as the loop's
-- (event_partition_size() wide, from 0), so handing them over renames and moves them; no
-- row is copied, and no position or key changes.
--
-- pg_partman 4.x (Debian 12's postgresql-15-partman is 4.7) and 5.x (recent Supabase
-- projects) differ where this calls them: create_parent's p_type ('native' in 4.x, 'range'
-- in 5.x) and create_partition_id's p_analyze (4.x only). Named arguments cover the rest.

-- The schema pg_partman is installed in, or NULL when it is not installed in this database.
CREATE OR REPLACE FUNCTION pg_partman_schema() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'pg_partman'
$$;

-- events as pg_partman names a parent: schema.table, unquoted.
CREATE OR REPLACE FUNCTION events_table_name() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'events'::regclass
$$;

-- Who keeps events' partitions: 'pg_partman' when pg_partman's part_config lists events,
-- else 'builtin' (maintain_event_partitions' own loop).
CREATE OR REPLACE FUNCTION event_partitions_keeper() RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_schema text := pg_partman_schema();
    v_listed boolean;
BEGIN
    IF v_schema IS NULL THEN
        RETURN 'builtin';
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT FROM %I.part_config WHERE parent_table = %L)',
                   v_schema, events_table_name()) INTO v_listed;
    RETURN CASE WHEN v_listed THEN 'pg_partman' ELSE 'builtin' END;
END $$;

-- Take every privilege off events' partitions outside store_partitions (pg_partman's, in
-- public) and turn row-level security on for them: they are read and appended through
-- events only. Quick when there is nothing to do (it reads the catalog).
CREATE OR REPLACE FUNCTION secure_event_partitions() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT c.oid::regclass AS rel, c.relrowsecurity,
               ARRAY(SELECT DISTINCT a.grantee FROM aclexplode(c.relacl) a
                     WHERE a.grantee <> c.relowner) AS grantees
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'events'::regclass
          AND c.relnamespace <> 'store_partitions'::regnamespace
    LOOP
        IF NOT r.relrowsecurity THEN
            EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', r.rel);
        END IF;
        IF cardinality(r.grantees) > 0 THEN
            EXECUTE format('REVOKE ALL ON %s FROM %s', r.rel,
                           (SELECT string_agg(CASE WHEN g = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(g)) END, ', ')
                            FROM unnest(r.grantees) g));
        END IF;
    END LOOP;
END $$;

-- The upkeep of maintain_event_partitions where pg_partman keeps the partitions: rows the
-- default partition caught move out as in the loop (pg_partman's own partition_data_id
-- would DELETE them from the default partition, which events' triggers refuse, and
-- pg_partman cannot attach a partition whose range the default holds rows of); the
-- partitions they and the next appends need, up to pg_partman's premake (or p_ahead, if
-- more) past the newest position handed out, are made by pg_partman (create_partition_id);
-- then its run_maintenance for events, which so finds its premake met and makes nothing
-- (it would drop partitions if someone set a retention for events in part_config: never
-- do; events are kept forever). The locks creating partitions needs are taken here first,
-- so a lock timeout (service/store.py) ends this as such: pg_partman raises every error
-- of its own again as a plain exception. Called by maintain_event_partitions, which holds
-- the maintainers' lock.
CREATE OR REPLACE FUNCTION maintain_event_partitions_partman(p_ahead integer DEFAULT 2)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    v_schema text := pg_partman_schema();
    v_major integer := (SELECT split_part(extversion, '.', 1)::integer FROM pg_extension
                        WHERE extname = 'pg_partman');
    v_parent text := events_table_name();
    v_size bigint;
    v_ahead bigint;
    v_before text[] := ARRAY(SELECT partition FROM event_partitions);
    v_newest bigint;
    v_from bigint;
    v_default regclass;
    v_caught record;
BEGIN
    EXECUTE format('SELECT partition_interval::bigint, greatest(premake, %s) FROM %I.part_config '
                   'WHERE parent_table = %L', p_ahead, v_schema, v_parent) INTO v_size, v_ahead;
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
    INTO v_newest FROM events_position_seq;
    SELECT coalesce(max(to_position), 0) INTO v_from FROM event_partitions;
    v_caught := detach_caught_events();
    v_newest := greatest(v_newest, v_caught.newest);
    IF v_from <= v_newest + v_ahead * v_size THEN
        IF v_caught.moving IS NULL THEN  -- what ATTACH PARTITION takes (detaching took more)
            LOCK TABLE events IN SHARE UPDATE EXCLUSIVE MODE;
            v_default := events_default_partition();
            IF v_default IS NOT NULL THEN
                EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', v_default);
            END IF;
        END IF;
        EXECUTE format('SELECT %I.create_partition_id(p_parent_table := %L, p_partition_ids := %L::bigint[]%s)',
                       v_schema, v_parent,
                       ARRAY(SELECT generate_series(v_from, v_newest + v_ahead * v_size, v_size)),
                       CASE WHEN v_major < 5 THEN ', p_analyze := false' ELSE '' END);
    END IF;
    PERFORM restore_caught_events(v_caught.moving);
    EXECUTE format('SELECT %I.run_maintenance(p_parent_table := %L)', v_schema, v_parent);
    PERFORM secure_event_partitions();
    RETURN QUERY SELECT p.partition FROM event_partitions p
                 WHERE p.from_position IS NOT NULL AND p.partition <> ALL (v_before)
                 ORDER BY p.from_position;
END $$;

-- Hand events' partitions to pg_partman: install it (in the schema partman) if it is not
-- installed, move the rows the default partition holds into partitions of their own (the
-- loop), give every partition pg_partman's name in events' schema, drop our (now empty)
-- default partition, and register events with create_parent, which makes its default
-- partition and any partition missing up to its premake. Caller holds no lock; this takes
-- events' ACCESS EXCLUSIVE lock until its transaction ends (a catalog change, no copy).
CREATE OR REPLACE FUNCTION event_partitions_to_partman() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_schema text := pg_partman_schema();
    v_major integer;
    v_parent text := events_table_name();
    v_parent_schema text := split_part(events_table_name(), '.', 1);
    v_held boolean;
    r record;
BEGIN
    IF v_schema IS NULL THEN
        CREATE SCHEMA IF NOT EXISTS partman;
        CREATE EXTENSION pg_partman SCHEMA partman;
        v_schema := 'partman';
    END IF;
    v_major := (SELECT split_part(extversion, '.', 1)::integer FROM pg_extension WHERE extname = 'pg_partman');
    LOCK TABLE events IN ACCESS EXCLUSIVE MODE;
    PERFORM count(*) FROM maintain_event_partitions();  -- the loop: the default partition emptied
    FOR r IN
        SELECT c.oid::regclass AS rel, c.relnamespace::regnamespace::text AS nsp, c.relname::text AS name,
               p.from_position
        FROM event_partitions p JOIN pg_class c ON c.oid = p.partition::regclass
    LOOP
        IF r.from_position IS NULL THEN  -- the default partition, emptied above
            EXECUTE format('SELECT EXISTS (SELECT FROM %s)', r.rel) INTO v_held;
            IF v_held THEN
                RAISE EXCEPTION '% still holds events: not handed to pg_partman', r.rel;
            END IF;
            EXECUTE format('DROP TABLE %s', r.rel);
            CONTINUE;
        END IF;
        IF r.name <> 'events_p' || r.from_position THEN
            EXECUTE format('ALTER TABLE %s RENAME TO %I', r.rel, 'events_p' || r.from_position);
        END IF;
        IF r.nsp <> v_parent_schema THEN
            EXECUTE format('ALTER TABLE %I.%I SET SCHEMA %I', r.nsp, 'events_p' || r.from_position,
                           v_parent_schema);
        END IF;
    END LOOP;
    EXECUTE format('SELECT %I.create_parent(p_parent_table := %L, p_control := %L, p_type := %L, '
                   'p_interval := %L, p_premake := 4, p_automatic_maintenance := %L, p_jobmon := false)',
                   v_schema, v_parent, 'position', CASE WHEN v_major < 5 THEN 'native' ELSE 'range' END,
                   event_partition_size()::text, 'off');
    PERFORM secure_event_partitions();
END $$;

-- Hand events' partitions back to the loop: events leaves pg_partman's part_config (with
-- its template table), and every partition, the default one too, moves to store_partitions
-- with the name it has (the loop finds partitions by their bounds, not their names; its
-- default partition is store_partitions.events_default).
CREATE OR REPLACE FUNCTION event_partitions_from_partman() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_schema text := pg_partman_schema();
    v_parent text := events_table_name();
    v_template text;
    r record;
BEGIN
    LOCK TABLE events IN ACCESS EXCLUSIVE MODE;
    EXECUTE format('DELETE FROM %I.part_config WHERE parent_table = %L RETURNING template_table',
                   v_schema, v_parent) INTO v_template;
    IF v_template IS NOT NULL THEN
        EXECUTE format('DROP TABLE IF EXISTS %s', v_template);
    END IF;
    FOR r IN
        SELECT c.oid::regclass AS rel, c.relname::text AS name, p.from_position
        FROM event_partitions p JOIN pg_class c ON c.oid = p.partition::regclass
        WHERE c.relnamespace <> 'store_partitions'::regnamespace
    LOOP
        EXECUTE format('ALTER TABLE %s SET SCHEMA store_partitions', r.rel);
        IF r.from_position IS NULL AND r.name <> 'events_default' THEN
            EXECUTE format('ALTER TABLE store_partitions.%I RENAME TO events_default', r.name);
        END IF;
    END LOOP;
END $$;

-- Who is to keep events' partitions, as the operator chose (EVENT_PARTITIONS): 'partman'
-- (pg_partman, which the server must have), 'builtin' (the loop, even where pg_partman is
-- there), or 'auto' (pg_partman where the server has it, else the loop). Hands them over
-- when the keeper changes; a database set up with the loop that later gains pg_partman is
-- handed over at the next migrate. Returns the keeper: 'pg_partman' or 'builtin'.
CREATE OR REPLACE FUNCTION manage_event_partitions(p_mode text DEFAULT 'auto') RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_keeper text;
BEGIN
    IF p_mode IS NULL OR p_mode NOT IN ('auto', 'partman', 'builtin') THEN
        RAISE EXCEPTION 'EVENT_PARTITIONS must be auto, partman or builtin, not %', p_mode
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pg_advisory_xact_lock(7215019);  -- no maintenance meanwhile
    v_keeper := event_partitions_keeper();
    IF p_mode = 'builtin' THEN
        IF v_keeper = 'pg_partman' THEN
            PERFORM event_partitions_from_partman();
        END IF;
        RETURN 'builtin';
    END IF;
    IF v_keeper = 'pg_partman' THEN
        RETURN v_keeper;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_partman') THEN
        IF p_mode = 'partman' THEN
            RAISE EXCEPTION 'EVENT_PARTITIONS=partman, but this server has no pg_partman '
                            '(pg_available_extensions does not list it)'
                USING ERRCODE = 'feature_not_supported',
                      HINT = 'install pg_partman on the server, or set EVENT_PARTITIONS=auto or builtin';
        END IF;
        RETURN 'builtin';
    END IF;
    IF p_mode = 'partman' THEN
        PERFORM event_partitions_to_partman();
        RETURN 'pg_partman';
    END IF;
    -- auto: where the hand-over fails (a role that may not install or use pg_partman here,
    -- as on a plain PostgreSQL, where only a superuser may create it; pg_partman's own
    -- errors, which it raises again as plain exceptions) events keeps the loop, with a
    -- warning saying why. The hand-over is all or nothing: none of it is left.
    BEGIN
        PERFORM event_partitions_to_partman();
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_partman is available but events could not be handed to it (%: %); '
                      'events keeps the built-in partition upkeep', SQLSTATE, split_part(SQLERRM, E'\n', 1);
        RETURN 'builtin';
    END;
    RETURN 'pg_partman';
END $$;


-- Keep partitions ahead of the appends: after it, the positions up to p_ahead partitions'
-- worth past the newest one handed out have a partition. Any rows the default partition
-- caught (appended past the last partition while this had not run) move to partitions of
-- their own first: detached, the partitions they need created, copied back in position
-- order, dropped. Their positions and keys do not change (event_keys still points at
-- them). Returns the names of the partitions created.
--
-- Where pg_partman keeps events' partitions (manage_event_partitions above), the same, with
-- the partitions made by pg_partman (maintain_event_partitions_partman); otherwise by the
-- loop here, which names them store_partitions.events_<n, six digits>.
--
-- Runs at migrate (the end of this file) and from the worker every few minutes (service/
-- store.py), with either keeper; pg_cron can call it instead on Supabase (docs/deploy.md).
-- Quick when there is nothing to do: it reads the catalog and the sequence. Creating a
-- partition takes a brief ACCESS EXCLUSIVE lock on events: an append in flight finishes
-- first, the next waits for the CREATE.
CREATE OR REPLACE FUNCTION maintain_event_partitions(p_ahead integer DEFAULT 2)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    v_size bigint := event_partition_size();
    v_newest bigint;
    v_from bigint;
    v_caught record;
    v_name text;
BEGIN
    -- one maintainer at a time (the worker's processes, migrate, pg_cron)
    PERFORM pg_advisory_xact_lock(7215019);
    IF event_partitions_keeper() = 'pg_partman' THEN
        RETURN QUERY SELECT * FROM maintain_event_partitions_partman(p_ahead);
        RETURN;
    END IF;
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
    INTO v_newest FROM events_position_seq;
    SELECT coalesce(max(to_position), 0) INTO v_from FROM event_partitions;
    v_caught := detach_caught_events();
    v_newest := greatest(v_newest, v_caught.newest);
    WHILE v_from <= v_newest + p_ahead * v_size LOOP
        v_name := 'events_' || lpad((v_from / v_size)::text, 6, '0');
        EXECUTE format('CREATE TABLE store_partitions.%I PARTITION OF events FOR VALUES FROM (%s) TO (%s)',
                       v_name, v_from, v_from + v_size);
        RETURN NEXT 'store_partitions.' || v_name;
        v_from := v_from + v_size;
    END LOOP;
    PERFORM restore_caught_events(v_caught.moving);
END $$;


-- Replicate webhooks -------------------------------------------------------------------------
-- Record a Replicate webhook in one call: decide its stream, append, fold.
--
-- The stream is the job named by the webhook URL's ?job= when that job exists; else
-- the job our own records already tie the prediction to; else the prediction id
-- itself (an orphan, still recorded so Replicate stops retrying and a person can see it).

-- PL/pgSQL rather than SQL so the two lookups are planned once per session, not per webhook.
CREATE OR REPLACE FUNCTION webhook_stream(p_job text, p_prediction_id text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_stream text;
BEGIN
    SELECT id::text INTO v_stream FROM jobs WHERE id = stream_job_id(p_job);
    IF v_stream IS NULL THEN
        SELECT job_id::text INTO v_stream FROM predictions
        WHERE id = p_prediction_id AND job_id IS NOT NULL;
    END IF;
    RETURN coalesce(v_stream, p_prediction_id);
END $$;

-- What a webhook's event keeps of its body: what the projections and history views read
-- (sql/fold.sql's prediction_facts and prediction_body, history_event_summary, the
-- submission's adoption of a prediction), and nothing else. The whole body, with its
-- headers, goes to the delivery log (deliveries, migration 018), which retention empties.
-- The logs, the big part of a body (Replicate resends them whole, every half second while a
-- prediction runs), are kept as the tail predictions.logs_tail keeps, with their whole
-- length in logs_length when they were cut. Input, urls, webhook settings and other fields
-- are left out. A body that is no JSON object is kept as it is (the events constraint
-- refuses it, as before; so does it a NULL). PL/pgSQL, not SQL: a SQL function with a
-- subquery is not inlined, and its body was planned again at every webhook (~90 us of an
-- append's ~1,200, pg_stat_statements); a PL/pgSQL function's plan is made once a session.
CREATE OR REPLACE FUNCTION webhook_facts(p_body jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    c_kept CONSTANT text[] := '{id,status,error,metrics,output,model,version,data_removed,'
                              'created_at,started_at,completed_at,logs}';
    v_facts jsonb;
    v_logs text;
BEGIN
    IF jsonb_typeof(p_body) <> 'object' THEN
        RETURN p_body;
    END IF;
    -- Every step a simple expression (no query for PL/pgSQL to start, ~77,000 instructions
    -- a webhook less, callgrind): the keys Replicate sends that no projection reads are
    -- taken out by name; only a body with a key neither kept nor named here (one Replicate
    -- added since) takes the long way, which reads its keys.
    v_facts := p_body - '{input,urls,webhook,webhook_events_filter,webhook_completed,stream}'::text[];
    IF v_facts - c_kept <> '{}'::jsonb THEN
        v_facts := v_facts - ARRAY(SELECT k FROM jsonb_object_keys(v_facts) k WHERE k <> ALL (c_kept));
    END IF;
    IF jsonb_typeof(v_facts -> 'logs') = 'string' THEN
        v_logs := v_facts ->> 'logs';
        -- no more bytes than 4,000 is no more characters: counted only when it may be cut
        IF octet_length(v_logs) > 4000 AND length(v_logs) > 4000 THEN
            v_facts := v_facts || jsonb_build_object('logs', right(v_logs, 4000), 'logs_length', length(v_logs));
        END IF;
    END IF;
    RETURN v_facts;
END $$;


-- Webhooks that arrive together are recorded together: one statement, one transaction,
-- one commit for the group (group commit; service/groups.py gathers them in the web
-- process). Each webhook is still appended and folded exactly as alone: the same
-- append_event, in the same transaction as its projection update, and it is answered
-- only after that transaction commits. What the group shares is the per-statement and
-- per-commit work (the round trip, the top-level statement's start-up, the commit record
-- and its WAL flush), which for one webhook measured about a third of the database's time.
--
-- p_group: a JSON array of {"webhook_id", "job", "body", "metadata"}, one per webhook, as
-- append_webhook takes them. Returns one row per element, n = its 1-based place in the
-- array. The appends run in stream order (then array order), so two groups committing at
-- once take their streams' advisory locks in the same order and cannot deadlock on them.
CREATE OR REPLACE FUNCTION append_webhooks(p_group jsonb)
RETURNS TABLE (n integer, event_position bigint, duplicate boolean, stream text)
LANGUAGE plpgsql AS $$
DECLARE
    w record;
    a record;
BEGIN
    FOR w IN
        -- nullif: a JSON null is SQL NULL here, as it is when append_webhook is called
        SELECT g.n::integer AS n, g.e ->> 'webhook_id' AS webhook_id,
               nullif(g.e -> 'body', 'null') AS body, nullif(g.e -> 'metadata', 'null') AS metadata,
               webhook_stream(g.e ->> 'job', g.e -> 'body' ->> 'id') AS stream
        FROM jsonb_array_elements(p_group) WITH ORDINALITY AS g(e, n)
        ORDER BY stream, g.n
    LOOP
        SELECT * INTO a
        FROM append_event(w.webhook_id, w.stream, 'replicate.webhook', webhook_facts(w.body), w.metadata);
        IF NOT a.duplicate THEN
            INSERT INTO deliveries (position, webhook_id, headers, body)
            VALUES (a.event_position, w.webhook_id,
                    coalesce(w.metadata -> 'headers', '{}'::jsonb), w.body);
        END IF;
        n := w.n;  -- the row out, from the OUT parameters: no query to start, as RETURN QUERY has
        event_position := a.event_position;
        duplicate := a.duplicate;
        stream := w.stream;
        RETURN NEXT;
    END LOOP;
END $$;

-- One webhook is a group of one: a single definition of how a webhook is recorded.
-- PL/pgSQL so its one statement is planned once a session, not at every call as a SQL
-- function's body is.
CREATE OR REPLACE FUNCTION append_webhook(p_webhook_id text, p_job text, p_body jsonb, p_metadata jsonb)
RETURNS TABLE (event_position bigint, duplicate boolean, stream text)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    SELECT a.event_position, a.duplicate, a.stream
    FROM append_webhooks(jsonb_build_array(jsonb_build_object(
        'webhook_id', p_webhook_id, 'job', p_job, 'body', p_body, 'metadata', p_metadata))) a;
END $$;



-- The delivery log's partitions ------------------------------------------------------------
-- deliveries (migration 018) is partitioned by the UTC day a webhook was received:
-- store_partitions.deliveries_YYYYMMDD. The partitions, with their day and size on disk;
-- the default partition (day NULL) last.
CREATE OR REPLACE VIEW delivery_partitions AS
SELECT c.oid::regclass::text AS partition,
       to_date(substring(c.relname FROM '^deliveries_(\d{8})$'), 'YYYYMMDD') AS day,
       pg_total_relation_size(c.oid) AS bytes
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'deliveries'::regclass
ORDER BY day NULLS LAST;

-- Create the delivery log's partitions from today (UTC) to p_days_ahead days ahead, after
-- moving any rows the default partition caught into partitions of their days, as
-- maintain_event_partitions does for events. Returns the partitions created.
CREATE OR REPLACE FUNCTION maintain_delivery_partitions(p_days_ahead integer DEFAULT 3)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    v_today date := (now() AT TIME ZONE 'UTC')::date;
    v_day date;
    v_caught date[] := '{}';  -- the days of the rows the default partition caught
    v_name text;
BEGIN
    PERFORM pg_advisory_xact_lock(7215018);
    v_day := v_today;
    IF EXISTS (SELECT FROM store_partitions.deliveries_default) THEN
        LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE;
        ALTER TABLE deliveries DETACH PARTITION store_partitions.deliveries_default;
        ALTER TABLE store_partitions.deliveries_default RENAME TO deliveries_default_moving;
        CREATE TABLE store_partitions.deliveries_default PARTITION OF deliveries DEFAULT;
        EXECUTE 'SELECT array_agg(DISTINCT (received_at AT TIME ZONE ''UTC'')::date) '
                'FROM store_partitions.deliveries_default_moving' INTO v_caught;
        v_day := least(v_day, (SELECT min(d) FROM unnest(v_caught) d));
    END IF;
    WHILE v_day <= v_today + p_days_ahead LOOP
        v_name := 'deliveries_' || to_char(v_day, 'YYYYMMDD');
        IF to_regclass('store_partitions.' || v_name) IS NULL
           AND (v_day >= v_today OR v_day = ANY (v_caught)) THEN
            EXECUTE format('CREATE TABLE store_partitions.%I PARTITION OF deliveries '
                           'FOR VALUES FROM (%L) TO (%L)', v_name,
                           v_day::timestamp AT TIME ZONE 'UTC', (v_day + 1)::timestamp AT TIME ZONE 'UTC');
            RETURN NEXT 'store_partitions.' || v_name;
        END IF;
        v_day := v_day + 1;
    END LOOP;
    IF to_regclass('store_partitions.deliveries_default_moving') IS NOT NULL THEN
        EXECUTE 'INSERT INTO deliveries SELECT * FROM store_partitions.deliveries_default_moving';
        DROP TABLE store_partitions.deliveries_default_moving;
    END IF;
END $$;

-- Retention: the delivery log's partitions whose whole day is more than p_retention_days
-- days old (UTC), with their size; dropped unless p_dry_run, and the run recorded in
-- store_upkeep (the dashboard shows when retention last ran). 0 days keeps everything.
-- Whole partitions only, never rows; the default partition is never dropped. A DROP takes
-- a brief ACCESS EXCLUSIVE lock on deliveries: a webhook's append waits for it, not for a
-- scan (scripts/bench/scale.py measures the wait). p_today: the day it counts from (a
-- test's or a dry run's "as of"), today (UTC) by default.
CREATE OR REPLACE FUNCTION prune_deliveries(
    p_retention_days integer, p_dry_run boolean DEFAULT false, p_today date DEFAULT NULL
) RETURNS TABLE (partition text, day date, bytes bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_cutoff date := coalesce(p_today, (now() AT TIME ZONE 'UTC')::date) - p_retention_days;
    v_dropped text[] := '{}';
    v_freed bigint := 0;
    r record;
BEGIN
    IF p_retention_days IS NULL OR p_retention_days < 0 THEN
        RAISE EXCEPTION 'retention must be 0 (forever) or a number of days, not %', p_retention_days
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pg_advisory_xact_lock(7215018);
    FOR r IN SELECT * FROM delivery_partitions d
             WHERE p_retention_days > 0 AND d.day IS NOT NULL AND d.day < v_cutoff ORDER BY d.day LOOP
        IF NOT p_dry_run THEN
            EXECUTE format('DROP TABLE %s', r.partition);
        END IF;
        partition := r.partition; day := r.day; bytes := r.bytes;
        v_dropped := v_dropped || r.partition;
        v_freed := v_freed + r.bytes;
        RETURN NEXT;
    END LOOP;
    IF NOT p_dry_run THEN
        INSERT INTO store_upkeep (action, dropped, freed_bytes) VALUES ('prune', v_dropped, v_freed);
    END IF;
END $$;

-- At every migrate: partitions ahead of the appends (and none missing after an upgrade).
SELECT count(*) FROM maintain_event_partitions();
SELECT count(*) FROM maintain_delivery_partitions();
