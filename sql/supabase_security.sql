-- Supabase: who may do what. Explicit privileges for the API roles, row-level security
-- policies, the Realtime publication, and the broadcast of a job's changes. Applies
-- unchanged to a Supabase project (where `postgres` is not a superuser) and to a plain
-- PostgreSQL (no anon/authenticated/service_role roles, no supabase_realtime publication,
-- no realtime schema: those parts are skipped). The data side (owner_id, RLS turned on,
-- replica identity, the job_change type) is migration 009.
--
-- Re-applied as a whole by `flask --app service migrate` whenever this file changes (see
-- docs/sql.md): every statement here must be safe to run again. It runs last: it grants
-- and revokes on the views and functions the other files define.

-- 1. Privileges, granted explicitly ------------------------------------------------------
-- Older Supabase projects grant every new table in public to anon, authenticated and
-- service_role; newer ones grant nothing. Either way, what each role may do is said here:
--   anon           nothing at all (it is the public key in every browser)
--   authenticated  SELECT on jobs, predictions and outputs, and row-level security below
--                  narrows that to the rows of the user's own jobs. Only the columns a
--                  page shows: Realtime leaves out the columns a role cannot select, so
--                  the change messages stay small (no inputs, raw outputs, logs or fold
--                  keys, and none of the bookkeeping columns that change with every event)
--   service_role   reads everything, and appends to events (never UPDATE or DELETE it:
--                  it bypasses row-level security, not the events triggers of sql/store.sql)
-- The service itself connects as the owner of the tables (postgres on Supabase); an
-- owner is not subject to row-level security. Functions are all SECURITY INVOKER, so
-- these table privileges also decide what calling them through the API can do.
-- A table added by a migration must be revoked and granted here the same way (a test
-- lists every table and checks that anon can do nothing with any of them).
DO $$
DECLARE
    -- Ours only: a Supabase project's public schema also holds its other tables, whose
    -- privileges are not this file's business.
    v_relations text[] := ARRAY[
        'events', 'event_keys', 'event_partitions', 'deliveries', 'delivery_partitions',
        'store_upkeep', 'jobs', 'predictions', 'outputs', 'tasks', 'unrecorded_webhooks',
        'jobs_feed_listeners', 'schema_migrations', 'schema_repeatables', 'job_stream_stats',
        'job_step_rollups', 'job_step_output_rollups', 'job_history', 'job_timeline',
        'model_daily_summary', 'orphan_predictions', 'owner_compute', 'model_compute'];
    v_sequences text[] := ARRAY[
        pg_get_serial_sequence('events', 'position'), pg_get_serial_sequence('tasks', 'id'),
        pg_get_serial_sequence('unrecorded_webhooks', 'id'),
        pg_get_serial_sequence('store_upkeep', 'id')];
    v_role text;
    v_name text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT FROM pg_roles WHERE rolname = v_role);
        FOREACH v_name IN ARRAY v_relations LOOP
            CONTINUE WHEN to_regclass(v_name) IS NULL;  -- schema_*, when applied by hand
            EXECUTE format('REVOKE ALL ON %s FROM %I', to_regclass(v_name), v_role);
            IF v_role = 'service_role' THEN
                EXECUTE format('GRANT SELECT ON %s TO service_role', to_regclass(v_name));
            END IF;
        END LOOP;
        FOREACH v_name IN ARRAY v_sequences LOOP
            EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM %I', v_name, v_role);
        END LOOP;
    END LOOP;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
        GRANT SELECT (id, owner_id, model, version, deployment, aspect_ratio, status,
                      predictions_expected, predictions_submitted, predictions_succeeded,
                      predictions_failed, outputs_expected, outputs_processed, outputs_failed,
                      outputs, error, canceled_at, created_at, started_at, completed_at, deadline)
            ON jobs TO authenticated;
        GRANT SELECT (id, job_id, step, status, error, metrics, output_urls, model, version,
                      created_at, started_at, completed_at, superseded)
            ON predictions TO authenticated;
        GRANT SELECT (prediction_id, index, job_id, status, url, original_url, width, height,
                      bytes, error, recorded_at)
            ON outputs TO authenticated;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'service_role') THEN
        GRANT INSERT ON events TO service_role;
        -- an append records its key (migration 017) and takes its position itself
        GRANT INSERT ON event_keys TO service_role;
        GRANT USAGE ON SEQUENCE events_position_seq TO service_role;
        GRANT INSERT ON deliveries TO service_role;
    END IF;
END $$;

-- job_activity (migration 010): nothing for anon and authenticated, read for service_role.
-- Unlike the tables above, service_role's other privileges on it are not revoked: on a
-- project whose default privileges grant new tables to the API roles, it keeps them.
DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('REVOKE ALL ON job_activity FROM %I', v_role);
        END IF;
    END LOOP;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'service_role') THEN
        GRANT SELECT ON job_activity TO service_role;
    END IF;
END $$;


-- 2. Row-level security policies ----------------------------------------------------------
-- Row-level security is on for every table (migrations 009, 010), so a role that is
-- granted a table by someone's default privileges still reads no row without a policy.
-- Policies exist only for:
--   * authenticated: the jobs it owns, and their predictions and outputs;
--   * app_user: reads and appends events, as it always could (sql/store.sql).
-- No policy for anon, and none lets anyone but app_user and the owner touch events
-- (service_role bypasses RLS; its privileges above say read and append).
DO $$
BEGIN
    -- Supabase: the authenticated role, and auth.uid() (the `sub` of the request's JWT, as
    -- PostgREST and Realtime set it). Without them no policy: RLS alone then shows nothing.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated')
       OR to_regprocedure('auth.uid()') IS NULL THEN
        RETURN;
    END IF;
    -- (SELECT auth.uid()): evaluated once per statement, not once per row
    DROP POLICY IF EXISTS jobs_owner_select ON jobs;
    CREATE POLICY jobs_owner_select ON jobs FOR SELECT TO authenticated
        USING (owner_id = (SELECT auth.uid()));
    DROP POLICY IF EXISTS predictions_owner_select ON predictions;
    CREATE POLICY predictions_owner_select ON predictions FOR SELECT TO authenticated
        USING (EXISTS (SELECT FROM jobs j
                       WHERE j.id = predictions.job_id AND j.owner_id = (SELECT auth.uid())));
    DROP POLICY IF EXISTS outputs_owner_select ON outputs;
    CREATE POLICY outputs_owner_select ON outputs FOR SELECT TO authenticated
        USING (EXISTS (SELECT FROM jobs j
                       WHERE j.id = outputs.job_id AND j.owner_id = (SELECT auth.uid())));
END $$;


-- 3. Realtime ------------------------------------------------------------------------------
-- jobs and predictions join the supabase_realtime publication when it exists. Only
-- ever ADD TABLE for a table not yet in it: dropping and recreating the publication would
-- silently take every other table of the project out of Realtime. A publication FOR ALL
-- TABLES already has them.
DO $$
DECLARE
    v_table text;
BEGIN
    FOREACH v_table IN ARRAY ARRAY['jobs', 'predictions'] LOOP
        IF EXISTS (SELECT FROM pg_publication WHERE pubname = 'supabase_realtime' AND NOT puballtables)
           AND NOT EXISTS (SELECT FROM pg_publication_tables
                           WHERE pubname = 'supabase_realtime' AND schemaname = current_schema()
                             AND tablename = v_table) THEN
            EXECUTE format('ALTER PUBLICATION supabase_realtime ADD TABLE %I.%I',
                           current_schema(), v_table);
        END IF;
    END LOOP;
END $$;

-- Broadcast (Supabase's recommendation at scale: one message per change to a topic,
-- instead of Realtime checking every subscriber's policies for every WAL change). When the
-- realtime schema exists, a change of what a page shows of a job (not a log line, not the
-- bookkeeping columns) is sent to the private topic job:<id>; the owner of the job may
-- receive it (policy on realtime.messages). Updates only: a job is inserted when its owner
-- creates it and deleted only by a replay, which also rewrites it (one message per job
-- whose row it brings back). Without the realtime schema (plain PostgreSQL), the trigger
-- and the policy are not installed. What a message carries is a job_change (the type:
-- migration 009).
CREATE OR REPLACE FUNCTION job_change(j jobs) RETURNS job_change
LANGUAGE sql IMMUTABLE
RETURN ROW(j.id, j.owner_id, j.status, j.predictions_expected, j.predictions_succeeded,
           j.predictions_failed, j.outputs_processed, j.outputs_failed, j.error,
           j.completed_at)::job_change;

-- Not SECURITY DEFINER: jobs is written only by the fold, as the role that owns it.
CREATE OR REPLACE FUNCTION jobs_broadcast_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM realtime.broadcast_changes('job:' || NEW.id::text, TG_OP, TG_OP, TG_TABLE_NAME,
                                       TG_TABLE_SCHEMA, job_change(NEW), job_change(OLD));
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION jobs_broadcast_change() FROM PUBLIC;

DO $$
BEGIN
    IF to_regprocedure('realtime.broadcast_changes(text, text, text, text, text, record, record, text)')
       IS NULL THEN
        RETURN;
    END IF;
    CREATE OR REPLACE TRIGGER jobs_broadcast_update AFTER UPDATE ON jobs
        FOR EACH ROW
        WHEN (OLD.status IS DISTINCT FROM NEW.status
              OR OLD.predictions_submitted IS DISTINCT FROM NEW.predictions_submitted
              OR OLD.predictions_succeeded IS DISTINCT FROM NEW.predictions_succeeded
              OR OLD.predictions_failed IS DISTINCT FROM NEW.predictions_failed
              OR OLD.outputs_processed IS DISTINCT FROM NEW.outputs_processed
              OR OLD.outputs_failed IS DISTINCT FROM NEW.outputs_failed
              OR OLD.error IS DISTINCT FROM NEW.error)
        EXECUTE FUNCTION jobs_broadcast_change();
    IF to_regclass('realtime.messages') IS NOT NULL
       AND to_regprocedure('realtime.topic()') IS NOT NULL
       AND to_regprocedure('auth.uid()') IS NOT NULL THEN
        -- A private channel job:<id> may be joined by the job's owner only. Supabase lets
        -- the project's postgres role add policies here; if a project does not, say so
        -- and go on: the broadcasts are then received by no one, which is safe.
        BEGIN
            DROP POLICY IF EXISTS jobs_owner_receive_broadcast ON realtime.messages;
            CREATE POLICY jobs_owner_receive_broadcast ON realtime.messages
                FOR SELECT TO authenticated
                USING (realtime.messages.extension = 'broadcast'
                       AND (SELECT realtime.topic()) LIKE 'job:%'
                       AND EXISTS (SELECT FROM jobs j
                                   WHERE j.id = (SELECT stream_job_id(substr(realtime.topic(), 5)))
                                     AND j.owner_id = (SELECT auth.uid())));
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE WARNING 'no policy on realtime.messages (%): job owners cannot receive '
                          'job:<id> broadcasts until one is added', SQLERRM;
        END;
    END IF;
END $$;
