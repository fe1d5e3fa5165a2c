-- Supabase: who owns a job, explicit privileges, row-level security, Realtime.
-- Applies unchanged to a Supabase project (where `postgres` is not a superuser) and to a
-- plain PostgreSQL (no anon/authenticated/service_role roles, no supabase_realtime
-- publication, no realtime schema: those parts are skipped).

-- 1. The owner of a job ----------------------------------------------------------------
-- owner_id is the Supabase user who created the job (the `sub` of the verified user JWT,
-- recorded by the jobs API in job.created's data as "owner_id"); NULL for a job created
-- with an API key. Like every projected column it comes from the events alone, so a
-- replay rebuilds it: job_facts below is 003's, unchanged but for the last column.
-- (The fold is being rewritten in 010: carry the owner_id line over.)
ALTER TABLE jobs ADD COLUMN owner_id uuid;

CREATE INDEX jobs_owner_created_at ON jobs (owner_id, created_at DESC, id DESC)
    WHERE owner_id IS NOT NULL;

CREATE OR REPLACE FUNCTION job_facts(
    stream text, data jsonb, created_at timestamptz, event_count integer,
    last_position bigint, updated_at timestamptz, canceled_at timestamptz, submit_failures integer
) RETURNS SETOF jobs
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT stream_job_id(stream),
           data ->> 'model',
           data ->> 'version',
           data ->> 'deployment',
           coalesce(data ->> 'aspect_ratio', '1:1'),
           coalesce(data -> 'postprocess', '{"mode": "auto"}'::jsonb),
           coalesce(data -> 'input', '{}'::jsonb),
           data -> 'then',
           coalesce(data -> 'metadata', '{}'::jsonb),
           'pending', coalesce(small_int(data ->> 'count'), 1),
           0, 0, 0, submit_failures, 0, 0, 0, '[]'::jsonb, NULL::text,
           canceled_at, created_at, NULL::timestamptz, NULL::timestamptz,
           updated_at, last_position, event_count,
           -- new in 009: the owner, when it is a canonical uuid (stream_job_id checks
           -- exactly that), else NULL rather than an error that would stop a replay
           stream_job_id(data ->> 'owner_id')
    WHERE stream_job_id(stream) IS NOT NULL
$$;


-- 2. Privileges, granted explicitly ------------------------------------------------------
-- Older Supabase projects grant every new table in public to anon, authenticated and
-- service_role; newer ones grant nothing. Either way, what each role may do is said here:
--   anon           nothing at all (it is the public key in every browser)
--   authenticated  SELECT on jobs, predictions and outputs, and row-level security below
--                  narrows that to the rows of the user's own jobs. Only the columns a
--                  page shows: Realtime leaves out the columns a role cannot select, so
--                  the change messages stay small (no inputs, raw outputs, logs or fold
--                  keys, and none of the bookkeeping columns that change with every event)
--   service_role   reads everything, and appends to events (never UPDATE or DELETE it:
--                  it bypasses row-level security, not the events triggers of 001)
-- The service itself connects as the owner of the tables (postgres on Supabase); an
-- owner is not subject to row-level security. Functions are all SECURITY INVOKER, so
-- these table privileges also decide what calling them through the API can do.
-- A migration after this one that adds a table must revoke and grant it the same way (a
-- test lists every table and checks that anon can do nothing with any of them).
DO $$
DECLARE
    -- Ours only: a Supabase project's public schema also holds its other tables, whose
    -- privileges are not this migration's business.
    v_relations text[] := ARRAY[
        'events', 'jobs', 'predictions', 'outputs', 'tasks', 'unrecorded_webhooks',
        'jobs_feed_listeners', 'schema_migrations', 'job_stream_stats', 'job_step_rollups',
        'job_step_output_rollups', 'job_derived', 'job_history', 'job_timeline',
        'model_daily_summary', 'orphan_predictions'];
    v_sequences text[] := ARRAY[
        pg_get_serial_sequence('events', 'position'), pg_get_serial_sequence('tasks', 'id'),
        pg_get_serial_sequence('unrecorded_webhooks', 'id')];
    v_role text;
    v_name text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT FROM pg_roles WHERE rolname = v_role);
        FOREACH v_name IN ARRAY v_relations LOOP
            CONTINUE WHEN to_regclass(v_name) IS NULL;  -- schema_migrations, when applied by hand
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
                      outputs, error, canceled_at, created_at, started_at, completed_at)
            ON jobs TO authenticated;
        GRANT SELECT (id, job_id, step, status, error, metrics, output_urls, model, version,
                      created_at, started_at, completed_at)
            ON predictions TO authenticated;
        GRANT SELECT (prediction_id, index, job_id, status, url, original_url, width, height,
                      bytes, error, recorded_at)
            ON outputs TO authenticated;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'service_role') THEN
        GRANT INSERT ON events TO service_role;
    END IF;
END $$;


-- 3. Row-level security -------------------------------------------------------------------
-- On for every table, so a role that is granted a table by someone's default privileges
-- still reads no row without a policy. Policies exist only for:
--   * authenticated: the jobs it owns, and their predictions and outputs;
--   * app_user (001): reads and appends events, as it always could.
-- No policy for anon, and none lets anyone but app_user and the owner touch events
-- (service_role bypasses RLS; its privileges above say read and append).
ALTER TABLE events ENABLE ROW LEVEL SECURITY;
ALTER TABLE jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE predictions ENABLE ROW LEVEL SECURITY;
ALTER TABLE outputs ENABLE ROW LEVEL SECURITY;
ALTER TABLE tasks ENABLE ROW LEVEL SECURITY;
ALTER TABLE unrecorded_webhooks ENABLE ROW LEVEL SECURITY;
ALTER TABLE jobs_feed_listeners ENABLE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF to_regclass('schema_migrations') IS NOT NULL THEN  -- the migrate command's record
        ALTER TABLE schema_migrations ENABLE ROW LEVEL SECURITY;
    END IF;
END $$;

CREATE POLICY events_app_user_select ON events FOR SELECT TO app_user USING (true);
CREATE POLICY events_app_user_insert ON events FOR INSERT TO app_user WITH CHECK (true);

DO $$
BEGIN
    -- Supabase: the authenticated role, and auth.uid() (the `sub` of the request's JWT, as
    -- PostgREST and Realtime set it). Without them no policy: RLS alone then shows nothing.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated')
       OR to_regprocedure('auth.uid()') IS NULL THEN
        RETURN;
    END IF;
    -- (SELECT auth.uid()): evaluated once per statement, not once per row
    CREATE POLICY jobs_owner_select ON jobs FOR SELECT TO authenticated
        USING (owner_id = (SELECT auth.uid()));
    CREATE POLICY predictions_owner_select ON predictions FOR SELECT TO authenticated
        USING (EXISTS (SELECT FROM jobs j
                       WHERE j.id = predictions.job_id AND j.owner_id = (SELECT auth.uid())));
    CREATE POLICY outputs_owner_select ON outputs FOR SELECT TO authenticated
        USING (EXISTS (SELECT FROM jobs j
                       WHERE j.id = outputs.job_id AND j.owner_id = (SELECT auth.uid())));
END $$;


-- 4. Realtime ------------------------------------------------------------------------------
-- jobs (008) and predictions join the supabase_realtime publication when it exists. Only
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

-- Replica identity: the primary key (DEFAULT), deliberately not FULL. FULL would write the
-- whole old row (a prediction's 4 kB of logs, a job's outputs) into the WAL with every
-- update, and Realtime does not pass old rows to subscribers under row-level security
-- anyway: a change names its row by primary key, and a DELETE carries only the key.
ALTER TABLE jobs REPLICA IDENTITY DEFAULT;
ALTER TABLE predictions REPLICA IDENTITY DEFAULT;

-- Broadcast (Supabase's recommendation at scale: one message per change to a topic,
-- instead of Realtime checking every subscriber's policies for every WAL change). When the
-- realtime schema exists, a change of what a page shows of a job (not a log line, not the
-- bookkeeping columns) is sent to the private topic job:<id>; the owner of the job may
-- receive it (policy on realtime.messages). Updates only: a job is inserted when its owner
-- creates it and deleted only by a replay, which also rewrites it (one message per job
-- whose row it brings back). Without the realtime schema (plain PostgreSQL), nothing is
-- installed.
-- What a broadcast carries: what a page shows of a job's progress, not the whole row (its
-- input and outputs can be kilobytes); the page fetches the rest when it needs it.
CREATE TYPE job_change AS (
    id uuid, owner_id uuid, status text, predictions_expected integer,
    predictions_succeeded integer, predictions_failed integer, outputs_processed integer,
    outputs_failed integer, error text, completed_at timestamptz
);

CREATE FUNCTION job_change(j jobs) RETURNS job_change
LANGUAGE sql IMMUTABLE
RETURN ROW(j.id, j.owner_id, j.status, j.predictions_expected, j.predictions_succeeded,
           j.predictions_failed, j.outputs_processed, j.outputs_failed, j.error,
           j.completed_at)::job_change;

-- Not SECURITY DEFINER: jobs is written only by the fold, as the role that owns it.
CREATE FUNCTION jobs_broadcast_change() RETURNS trigger
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
    CREATE TRIGGER jobs_broadcast_update AFTER UPDATE ON jobs
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
