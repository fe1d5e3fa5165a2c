-- The live path does less per event; the fold's rules are unchanged.
--
-- Measured with callgrind on a PostgreSQL 15 backend appending the append benchmark's
-- events, most of an append's instructions went to starting statements rather than to
-- the work they do (see scripts/bench/append.py and docs/reliability.md):
--   * every INSERT or UPDATE of a table with CHECK constraints parses and plans each
--     constraint again (PostgreSQL keeps them per statement execution, not per session):
--     about a tenth of an append, mostly the IN lists of known values;
--   * touch_job derived a job's columns in one UPDATE that joined four grouped views and
--     job_derived_values, whose inlined expression repeated each step's state many times
--     over (job_status used its arguments up to four times each): starting that plan cost
--     more than running it;
--   * on_event_applied ran its post-processing query for every webhook, including the
--     log webhooks that change nothing it reads.
-- What each change does is said beside it.


-- 1. CHECK constraints that are cheap to start -----------------------------------------------
-- The same rules, each a call of an IMMUTABLE PL/pgSQL function: a constraint's stored
-- expression is parsed for every statement that writes its table, and a call is short to
-- parse where an IN list of constants is long; the function's own plan is kept for the
-- session. The constraint names are kept: errors still name the rule that refused a row.
CREATE FUNCTION is_event_type(type text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN type IN ('job.created', 'job.canceled',
                    'prediction.submitted', 'prediction.submit_failed',
                    'replicate.webhook', 'replicate.polled',
                    'output.processed', 'output.failed');
END $$;

CREATE FUNCTION is_object(value jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN jsonb_typeof(value) = 'object';
END $$;

CREATE FUNCTION is_nonempty(value text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN value <> '';
END $$;

CREATE FUNCTION is_output_status(status text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN status IN ('processed', 'failed');
END $$;

CREATE FUNCTION is_job_status(status text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN status IN ('pending', 'queued', 'running', 'processing', 'completed', 'failed', 'canceled');
END $$;

CREATE FUNCTION is_task_kind(kind text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN kind IN ('submit_prediction', 'cancel_prediction', 'process_output');
END $$;

CREATE FUNCTION is_task_status(status text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN status IN ('queued', 'running', 'done', 'failed');
END $$;

-- events refuses UPDATE through a trigger, not ALTER TABLE: the constraints are replaced
-- in place (each new one is checked against every row already there).
ALTER TABLE events
    DROP CONSTRAINT events_type_known, ADD CONSTRAINT events_type_known CHECK (is_event_type(type)),
    DROP CONSTRAINT events_data_is_object, ADD CONSTRAINT events_data_is_object CHECK (is_object(data)),
    DROP CONSTRAINT events_metadata_is_object,
    ADD CONSTRAINT events_metadata_is_object CHECK (is_object(metadata)),
    DROP CONSTRAINT events_stream_nonempty, ADD CONSTRAINT events_stream_nonempty CHECK (is_nonempty(stream)),
    DROP CONSTRAINT events_key_nonempty, ADD CONSTRAINT events_key_nonempty CHECK (is_nonempty(event_key));
ALTER TABLE jobs DROP CONSTRAINT jobs_status_known,
    ADD CONSTRAINT jobs_status_known CHECK (is_job_status(status));
ALTER TABLE outputs DROP CONSTRAINT outputs_status_known,
    ADD CONSTRAINT outputs_status_known CHECK (is_output_status(status));
ALTER TABLE tasks DROP CONSTRAINT tasks_kind_known,
    ADD CONSTRAINT tasks_kind_known CHECK (is_task_kind(kind));
ALTER TABLE tasks DROP CONSTRAINT tasks_status_known,
    ADD CONSTRAINT tasks_status_known CHECK (is_task_status(status));


-- 2. A job's status, each step's state said once ---------------------------------------------
-- The same answers as 003's job_status for every input (tests/test_fold_rebuild.py checks
-- all of them), written so that each argument appears once: an inlined SQL function
-- repeats an argument's whole expression at every use, and job_derived_values passes it
-- job_step_state's. nullif says "first step not done" without repeating first_step, and
-- the CASE over next_step names all six states job_step_state can give.
CREATE OR REPLACE FUNCTION job_status(canceled_at timestamptz, first_step text, has_next boolean,
                                      next_step text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN canceled_at IS NOT NULL THEN 'canceled' ELSE
    coalesce(nullif(first_step, 'done'),  -- failed, or still on its way: the job is where step 1 is
             CASE WHEN NOT has_next THEN 'completed' ELSE
                 CASE next_step
                     WHEN 'pending' THEN 'processing'  -- step 2 about to be submitted
                     WHEN 'queued' THEN 'running'
                     WHEN 'running' THEN 'running'
                     WHEN 'processing' THEN 'processing'
                     WHEN 'done' THEN 'completed'
                     WHEN 'failed' THEN 'failed' END
             END)
END;


-- Every derived column of a job, as 010's job_derived_values gives them, with the job's
-- status computed once. Inlined, 010's repeated the whole status expression (both steps'
-- states) in status, error and completed_at; here the counts are taken once (n, pulled up
-- into the caller, where a rebuild's whole-row arguments become plain columns) and the
-- status once, in a subquery that OFFSET 0 keeps whole, so the rest refers to its result.
CREATE OR REPLACE FUNCTION job_derived_values(
    canceled_at timestamptz, predictions_expected integer, has_next boolean,
    r1 job_step_rollups, o1 job_step_output_rollups,
    r2 job_step_rollups, o2 job_step_output_rollups
) RETURNS TABLE (
    status text, predictions_submitted integer, predictions_succeeded integer,
    predictions_failed integer, outputs_expected integer, outputs_processed integer,
    outputs_failed integer, outputs jsonb, error text, started_at timestamptz,
    completed_at timestamptz
)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT st.status,
           n.submitted1 + n.submitted2,
           n.succeeded1 + n.succeeded2,
           n.failed1 + n.failed2,
           n.outputs_expected1 + n.outputs_expected2,
           n.processed1 + n.processed2,
           n.outputs_failed1 + n.outputs_failed2,
           coalesce(o1.outputs, '[]'::jsonb) || coalesce(o2.outputs, '[]'::jsonb),
           CASE WHEN st.status = 'failed' THEN coalesce(r2.error, o2.error, r1.error, o1.error,
                                                        'no prediction succeeded') END,
           r1.started_at,
           CASE st.status
               WHEN 'canceled' THEN canceled_at
               WHEN 'completed' THEN greatest(r1.completed_at, o1.completed_at, r2.completed_at, o2.completed_at)
               WHEN 'failed' THEN greatest(r1.completed_at, o1.completed_at, r2.completed_at, o2.completed_at)
           END
    FROM (SELECT coalesce(r1.submitted, 0) AS submitted1, coalesce(r1.started, 0) AS started1,
                 coalesce(r1.succeeded, 0) AS succeeded1, coalesce(r1.failed, 0) AS failed1,
                 coalesce(r1.outputs_expected, 0) AS outputs_expected1,
                 coalesce(o1.processed, 0) AS processed1, coalesce(o1.failed, 0) AS outputs_failed1,
                 coalesce(r2.submitted, 0) AS submitted2, coalesce(r2.started, 0) AS started2,
                 coalesce(r2.succeeded, 0) AS succeeded2, coalesce(r2.failed, 0) AS failed2,
                 coalesce(r2.outputs_expected, 0) AS outputs_expected2,
                 coalesce(o2.processed, 0) AS processed2, coalesce(o2.failed, 0) AS outputs_failed2) n
    CROSS JOIN LATERAL (
        SELECT job_status(canceled_at,
                          job_step_state(predictions_expected, n.submitted1, n.started1, n.succeeded1,
                                         n.failed1, n.outputs_expected1, n.processed1, n.outputs_failed1),
                          has_next,
                          job_step_state(1, n.submitted2, n.started2, n.succeeded2, n.failed2,
                                         n.outputs_expected2, n.processed2, n.outputs_failed2)) AS status
        OFFSET 0) st
$$;


-- 3. touch_job in small statements -----------------------------------------------------------
-- The same derivation (job_derived_values over the two steps' rollups, the canceled_at
-- and submit_failures this event leaves), in statements that are each quick to start:
-- the job's own columns, both steps' prediction rollups in one grouped read, the output
-- rollups only when the job has outputs, then an UPDATE by primary key that writes only
-- when a column changes. A job with no output rows has outputs_processed and
-- outputs_failed both 0 (every output event derives them), so for it the output rollups
-- are known to be empty and are not read.
CREATE OR REPLACE FUNCTION touch_job(p_job uuid, e events, p_derive boolean) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    r1 job_step_rollups[];  -- each a one-element array, or NULL: a record variable cannot
    r2 job_step_rollups[];  -- share an INTO list
    o1 job_step_output_rollups[];
    o2 job_step_output_rollups[];
    d record;
BEGIN
    INSERT INTO job_activity AS a (job_id, event_count, last_position, updated_at)
    VALUES (p_job, 1, e.position, e.recorded_at)
    ON CONFLICT (job_id) DO UPDATE SET
        event_count   = a.event_count + 1,
        last_position = greatest(a.last_position, excluded.last_position),
        updated_at    = greatest(a.updated_at, excluded.updated_at);
    IF NOT p_derive THEN
        RETURN;
    END IF;
    SELECT CASE WHEN e.type = 'job.canceled' THEN least(j.canceled_at, e.recorded_at)
                ELSE j.canceled_at END AS canceled_at,
           j.submit_failures + is_final_submit_failure(e.type, e.data)::integer AS submit_failures,
           j.predictions_expected,
           j.next_step IS NOT NULL AS has_next,
           j.outputs_processed + j.outputs_failed > 0
               OR e.type IN ('output.processed', 'output.failed') AS has_outputs
    INTO c
    FROM jobs j WHERE j.id = p_job;
    IF NOT FOUND THEN
        RETURN;  -- events before job.created: it derives the job when it comes
    END IF;
    SELECT array_agg(r) FILTER (WHERE r.step = 1), array_agg(r) FILTER (WHERE r.step = 2)
    INTO r1, r2
    FROM job_step_rollups r WHERE r.job_id = p_job;
    IF c.has_outputs THEN
        SELECT array_agg(o) FILTER (WHERE o.step = 1), array_agg(o) FILTER (WHERE o.step = 2)
        INTO o1, o2
        FROM job_step_output_rollups o WHERE o.job_id = p_job;
    END IF;
    SELECT * INTO d FROM job_derived_values(c.canceled_at, c.predictions_expected, c.has_next,
                                            r1[1], o1[1], r2[1], o2[1]);
    UPDATE jobs j
    SET (canceled_at, submit_failures, status, predictions_submitted, predictions_succeeded,
         predictions_failed, outputs_expected, outputs_processed, outputs_failed, outputs, error,
         started_at, completed_at)
      = (c.canceled_at, c.submit_failures, d.status, d.predictions_submitted,
         d.predictions_succeeded, d.predictions_failed, d.outputs_expected, d.outputs_processed,
         d.outputs_failed, d.outputs, d.error, d.started_at, d.completed_at)
    WHERE j.id = p_job
      AND (j.canceled_at, j.submit_failures, j.status, j.predictions_submitted,
           j.predictions_succeeded, j.predictions_failed, j.outputs_expected, j.outputs_processed,
           j.outputs_failed, j.outputs, j.error, j.started_at, j.completed_at)
          IS DISTINCT FROM
          (c.canceled_at, c.submit_failures, d.status, d.predictions_submitted,
           d.predictions_succeeded, d.predictions_failed, d.outputs_expected, d.outputs_processed,
           d.outputs_failed, d.outputs, d.error, d.started_at, d.completed_at);
END $$;


-- 4. The post-event hook only when the event changed something --------------------------
-- 010's apply_event, but on_event_applied is skipped for a prediction event that changed
-- nothing a job reads (a prediction's job, step, status, error, times, output count):
-- most of Replicate's webhooks, which bring more logs. What the hook does for a
-- prediction event (enqueue the processing of a succeeded prediction's outputs, keyed by
-- prediction and index) depends on nothing else such an event can change, and it is
-- idempotent: it was already done by the event that made the change.
CREATE OR REPLACE FUNCTION apply_event(e events) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := stream_job_id(e.stream);
    v_derive boolean := true;
    v_hook boolean := true;
BEGIN
    IF e.type = 'job.created' THEN
        -- Events recorded before job.created (they left a job_activity row) count as they
        -- would in a rebuild, and may have made predictions or outputs of this job: then its
        -- columns are derived from them. With none (the usual case), job_facts' row is
        -- already what the derivation gives (pending, nothing counted), and it is skipped.
        v_derive := EXISTS (SELECT FROM job_activity a WHERE a.job_id = v_job);
        INSERT INTO jobs
        SELECT j.* FROM job_stream_stats s
        CROSS JOIN LATERAL job_facts(e.stream, e.data, e.recorded_at, s.canceled_at,
                                     s.submit_failures) j
        WHERE s.stream = e.stream
        ON CONFLICT (id) DO NOTHING
        RETURNING v_derive OR predictions_expected < 1 INTO v_derive;  -- NULL: no new row
    ELSIF e.type IN ('prediction.submitted', 'replicate.webhook', 'replicate.polled',
                     'prediction.submit_failed') THEN
        v_derive := apply_prediction_event(e);
        v_hook := v_derive;
    ELSIF e.type IN ('output.processed', 'output.failed') THEN
        PERFORM apply_output_event(e);
    END IF;
    IF v_job IS NOT NULL THEN
        PERFORM touch_job(v_job, e, coalesce(v_derive, false));
    END IF;
    IF v_hook THEN
        PERFORM on_event_applied(e);
    END IF;
END $$;


-- 5. lz4 for what the live path compresses ---------------------------------------------------
-- Webhook bodies over ~2 kB and prediction log tails are compressed as they are stored;
-- with the default pglz that was about a twentieth of an append's instructions. lz4
-- compresses several times faster and decompresses faster too (a replay reads every
-- body). Only where the server was built with it (the Debian and Supabase builds are; the
-- embedded pgserver is not): values already stored keep their compression, and reading
-- either kind needs nothing from the reader.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE events ALTER COLUMN data SET COMPRESSION lz4;
        ALTER TABLE predictions ALTER COLUMN logs_tail SET COMPRESSION lz4,
                                ALTER COLUMN output SET COMPRESSION lz4;
        ALTER TABLE jobs ALTER COLUMN input SET COMPRESSION lz4,
                         ALTER COLUMN outputs SET COMPRESSION lz4;
    END IF;
END $$;


-- 6. The jobs change notification, asked cheaply ----------------------------------------------
-- 008's row trigger on jobs UPDATE had a WHEN clause comparing seven columns of OLD and
-- NEW: PostgreSQL parses a trigger's WHEN clause again for every statement that fires it,
-- and every job update paid for that. Now the trigger is queued only while a dashboard
-- listens (a function call, short to parse), and the function compares the columns.
CREATE OR REPLACE FUNCTION jobs_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (OLD.status, OLD.predictions_submitted, OLD.predictions_succeeded, OLD.predictions_failed,
        OLD.outputs_processed, OLD.outputs_failed, OLD.error)
       IS DISTINCT FROM
       (NEW.status, NEW.predictions_submitted, NEW.predictions_succeeded, NEW.predictions_failed,
        NEW.outputs_processed, NEW.outputs_failed, NEW.error) THEN
        PERFORM pg_notify('jobs_changed', NEW.id::text);
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER jobs_notify_update ON jobs;
CREATE TRIGGER jobs_notify_update AFTER UPDATE ON jobs
    FOR EACH ROW WHEN (jobs_feed_listened())
    EXECUTE FUNCTION jobs_notify_change();
