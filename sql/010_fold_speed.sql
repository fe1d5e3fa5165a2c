-- A faster fold, same rules, and a jobs row that changes only when what it shows does.
-- 003_fold.sql's rules (facts, fold keys, how a job's status follows from its steps) are
-- unchanged; what changes is where a job's per-event bookkeeping lives and how much work
-- the live path and the rebuild do.
--
-- job_activity. Every event of a job used to rewrite its jobs row (event_count,
-- last_position, updated_at), so each of Replicate's log webhooks (one every 500 ms per
-- running prediction) was an UPDATE of jobs streamed to every Supabase Realtime
-- subscriber, and cost a new row version with an entry in each of the six indexes of jobs.
-- Those three columns move to job_activity: one narrow row per job stream, updated by
-- every event, in no publication, with only its primary key indexed (so its updates are
-- HOT). jobs is now updated only when a derived column changes.
--
-- Live path (append_event -> apply_event), per event:
--   * job_activity is upserted; the jobs row is updated once (it was updated twice: the
--     counters, then refresh_jobs' derived columns), and only when what it shows changes;
--   * a job's derived columns (status, counts, outputs, from the rollups of its predictions
--     and outputs) were recomputed for every event; a prediction event that changes nothing
--     those rollups read (most of Replicate's webhooks: more logs) now skips that.
--
-- Rebuild:
--   * rebuild_jobs wrote every job twice: job_facts rows first, then refresh_jobs(NULL)
--     rewrote each of them with its derived columns (a second row version, and every index
--     updated again). Now each job is inserted once, its derived columns computed on the
--     way in by job_derived_values, the one definition that the live path (touch_job)
--     uses as well. job_derived and refresh_jobs, the live path's old way to the same
--     columns, are dropped: nothing calls them any more.
--   * rebuild_predictions joined the winning events back by hashing every event (the whole
--     table, bodies included, to find a fifth of them); now it looks each winner up by
--     position, in position order.
--   * JIT is off for the rebuild's statements: its compile time (0.3-0.5 s a statement,
--     measured on PostgreSQL 15) exceeds what it saves on these expression-heavy plans.


-- 1. job_activity -------------------------------------------------------------------------
CREATE TABLE job_activity (
    job_id        uuid        PRIMARY KEY,
    event_count   integer     NOT NULL,
    last_position bigint      NOT NULL,
    updated_at    timestamptz NOT NULL   -- recorded_at of the job's latest event
) WITH (fillfactor = 70);  -- room on each page for the next versions of its rows (HOT)

COMMENT ON TABLE job_activity IS
    'Per job stream: how many events, the latest position and its time. A projection like '
    'jobs (rebuilt by replay), kept apart so that a log webhook does not rewrite jobs.';

-- Privileges and row-level security as 009 set them for every table: nothing for anon and
-- authenticated, read for service_role, RLS on (the service owns the table).
ALTER TABLE job_activity ENABLE ROW LEVEL SECURITY;
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

-- What it holds, for the events already recorded: exactly what a rebuild would write.
INSERT INTO job_activity (job_id, event_count, last_position, updated_at)
SELECT stream_job_id(stream), event_count, last_position, updated_at
FROM job_stream_stats
WHERE stream_job_id(stream) IS NOT NULL;

-- job_history keeps its columns, now read from job_activity.
CREATE OR REPLACE VIEW job_history WITH (security_invoker = true) AS
SELECT j.id,
       coalesce(j.model, j.deployment, j.version) AS model,
       j.aspect_ratio,
       j.status,
       j.created_at,
       j.started_at,
       j.completed_at,
       d.queued_duration,
       d.run_duration,
       d.total_duration,
       history_seconds(d.queued_duration) AS queued_seconds,
       history_seconds(d.run_duration) AS run_seconds,
       history_seconds(d.total_duration) AS total_seconds,
       p.predict_seconds * interval '1 second' AS predict_time,
       p.predict_seconds AS predict_time_seconds,
       coalesce(p.anomalies, 0)::integer AS predict_time_anomalies,
       j.predictions_expected,
       j.predictions_submitted,
       j.predictions_succeeded,
       j.predictions_failed,
       j.outputs_expected,
       j.outputs_processed AS outputs,
       j.outputs_failed,
       j.error,
       a.updated_at AS last_event_at,
       a.event_count
FROM jobs j
LEFT JOIN job_activity a ON a.job_id = j.id
CROSS JOIN LATERAL (SELECT
    history_duration(j.created_at, j.started_at) AS queued_duration,
    history_duration(j.started_at, j.completed_at) AS run_duration,
    history_duration(j.created_at, j.completed_at) AS total_duration) d
LEFT JOIN LATERAL (
    SELECT sum(history_predict_seconds(pr.metrics)) AS predict_seconds,
           count(*) FILTER (WHERE jsonb_typeof(pr.metrics -> 'predict_time') = 'number'
                              AND history_predict_seconds(pr.metrics) IS NULL) AS anomalies
    FROM predictions pr
    WHERE pr.job_id = j.id
) p ON true;

-- updated_at was indexed twice; its indexes go with it. The reconciler and the dashboard's
-- stuck-job panel ask for unfinished jobs, which are few: an index on them keyed by what
-- never changes finds them, and their job_activity row says how quiet each is. The change
-- feed's polling fallback (jobs_changed_since) asks the events, by their BRIN index on
-- recorded_at.
DROP INDEX jobs_updated_at;
DROP INDEX jobs_unfinished_updated_at;
CREATE INDEX jobs_unfinished ON jobs (created_at)
    WHERE status IN ('pending', 'queued', 'running', 'processing');

DROP FUNCTION job_facts(text, jsonb, timestamptz, integer, bigint, timestamptz, timestamptz, integer);
ALTER TABLE jobs DROP COLUMN event_count, DROP COLUMN last_position, DROP COLUMN updated_at;

-- A job as job.created describes it (003's, with 009's owner_id; without the columns that
-- moved to job_activity).
CREATE FUNCTION job_facts(
    stream text, data jsonb, created_at timestamptz, canceled_at timestamptz, submit_failures integer
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
           stream_job_id(data ->> 'owner_id')
    WHERE stream_job_id(stream) IS NOT NULL
$$;


-- 2. The fold -------------------------------------------------------------------------------
-- Every derived column of a job from its base row and the rollups of its two steps.
-- Shared by touch_job (the live path, one job at a time) and rebuild_jobs (every job at
-- once). An inlinable SQL function: its body becomes part of the calling query.
CREATE FUNCTION job_derived_values(
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
           coalesce(r1.submitted, 0) + coalesce(r2.submitted, 0),
           coalesce(r1.succeeded, 0) + coalesce(r2.succeeded, 0),
           coalesce(r1.failed, 0) + coalesce(r2.failed, 0),
           coalesce(r1.outputs_expected, 0) + coalesce(r2.outputs_expected, 0),
           coalesce(o1.processed, 0) + coalesce(o2.processed, 0),
           coalesce(o1.failed, 0) + coalesce(o2.failed, 0),
           coalesce(o1.outputs, '[]'::jsonb) || coalesce(o2.outputs, '[]'::jsonb),
           CASE WHEN st.status = 'failed' THEN coalesce(r2.error, o2.error, r1.error, o1.error,
                                                        'no prediction succeeded') END,
           r1.started_at,
           CASE st.status
               WHEN 'canceled' THEN canceled_at
               WHEN 'completed' THEN greatest(r1.completed_at, o1.completed_at, r2.completed_at, o2.completed_at)
               WHEN 'failed' THEN greatest(r1.completed_at, o1.completed_at, r2.completed_at, o2.completed_at)
           END
    FROM (SELECT job_step_state(predictions_expected, coalesce(r1.submitted, 0), coalesce(r1.started, 0),
                                coalesce(r1.succeeded, 0), coalesce(r1.failed, 0),
                                coalesce(r1.outputs_expected, 0), coalesce(o1.processed, 0),
                                coalesce(o1.failed, 0)) AS first_step) s1
    CROSS JOIN LATERAL (SELECT
        job_step_state(1, coalesce(r2.submitted, 0), coalesce(r2.started, 0),
                       coalesce(r2.succeeded, 0), coalesce(r2.failed, 0), coalesce(r2.outputs_expected, 0),
                       coalesce(o2.processed, 0), coalesce(o2.failed, 0)) AS next_step) s2
    CROSS JOIN LATERAL (SELECT job_status(canceled_at, s1.first_step, has_next, s2.next_step) AS status) st
$$;

-- 003's way to the same columns, now unused: touch_job and rebuild_jobs call
-- job_derived_values themselves.
DROP FUNCTION refresh_jobs(uuid);
DROP VIEW job_derived;

-- A filter on a projection's job column for one stream's rebuild ($1), or none.
CREATE FUNCTION job_filter(p_stream text, alias text) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN CASE WHEN p_stream IS NULL THEN 'true' ELSE alias || '.job_id = stream_job_id($1)' END;

CREATE OR REPLACE FUNCTION rebuild_jobs(p_stream text) RETURNS bigint
LANGUAGE plpgsql
-- Group the events by stream and join the rollups in memory (hash tables), rather than
-- reading events in stream order through the index and sorting rollups in files.
SET work_mem = '256MB'
SET jit = off
AS $$
DECLARE
    n bigint;
BEGIN
    -- s: each job stream's statistics, once (OFFSET 0: ask which streams are jobs once per
    -- stream, not once per event), for job_activity and for the jobs rows alike.
    -- b: each job as job.created describes it (OFFSET 0: hand job_derived_values plain
    -- columns, since an argument that is an expression used more than once keeps the
    -- functions it calls from being inlined, and a call per job costs more than the rest).
    -- When one stream is rebuilt, the rollups are filtered to its job, so they group only
    -- its rows.
    EXECUTE format($sql$
        WITH s AS MATERIALIZED (
            SELECT * FROM (SELECT * FROM job_stream_stats s WHERE %1$s OFFSET 0) s
            WHERE stream_job_id(s.stream) IS NOT NULL),
        activity AS (
            INSERT INTO job_activity (job_id, event_count, last_position, updated_at)
            SELECT stream_job_id(s.stream), s.event_count, s.last_position, s.updated_at FROM s)
        INSERT INTO jobs (id, model, version, deployment, aspect_ratio, postprocess, input,
                          next_step, metadata, status, predictions_expected, predictions_submitted,
                          predictions_succeeded, predictions_failed, submit_failures,
                          outputs_expected, outputs_processed, outputs_failed, outputs, error,
                          canceled_at, created_at, started_at, completed_at, owner_id)
        SELECT b.id, b.model, b.version, b.deployment, b.aspect_ratio, b.postprocess, b.input,
               b.next_step, b.metadata, d.status, b.predictions_expected, d.predictions_submitted,
               d.predictions_succeeded, d.predictions_failed, b.submit_failures,
               d.outputs_expected, d.outputs_processed, d.outputs_failed, d.outputs, d.error,
               b.canceled_at, b.created_at, d.started_at, d.completed_at, b.owner_id
        FROM (SELECT j.*
              FROM s
              JOIN events c ON c.stream = s.stream AND c.type = 'job.created'
              CROSS JOIN LATERAL job_facts(c.stream, c.data, c.recorded_at, s.canceled_at,
                                           s.submit_failures) j
              OFFSET 0) b
        LEFT JOIN job_step_rollups r1 ON r1.job_id = b.id AND r1.step = 1 AND %2$s
        LEFT JOIN job_step_output_rollups o1 ON o1.job_id = b.id AND o1.step = 1 AND %3$s
        LEFT JOIN job_step_rollups r2 ON r2.job_id = b.id AND r2.step = 2 AND %4$s
        LEFT JOIN job_step_output_rollups o2 ON o2.job_id = b.id AND o2.step = 2 AND %5$s
        CROSS JOIN LATERAL job_derived_values(b.canceled_at, b.predictions_expected,
                                              b.next_step IS NOT NULL, r1, o1, r2, o2) d
    $sql$, stream_filter(p_stream, 's'), job_filter(p_stream, 'r1'), job_filter(p_stream, 'o1'),
       job_filter(p_stream, 'r2'), job_filter(p_stream, 'o2')) USING p_stream;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION clear_projections(p_stream text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_stream IS NULL THEN
        DELETE FROM outputs;
        DELETE FROM predictions;
        DELETE FROM jobs;
        DELETE FROM job_activity;
    ELSE
        DELETE FROM outputs WHERE job_id = stream_job_id(p_stream);
        DELETE FROM predictions WHERE job_id = stream_job_id(p_stream)
            OR (job_id IS NULL AND id = p_stream);
        DELETE FROM jobs WHERE id = stream_job_id(p_stream);
        DELETE FROM job_activity WHERE job_id = stream_job_id(p_stream);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION rebuild_predictions(p_stream text) RETURNS bigint
LANGUAGE plpgsql
-- The aggregation keeps one group per prediction (about 1 kB each): in memory it reads
-- each event once; spilled to disk it would write and read them all again.
SET work_mem = '256MB'
SET jit = off
AS $$
DECLARE
    n bigint;
    v_compression text := current_setting('default_toast_compression');
BEGIN
    -- The log tails are most of what this writes; lz4, where the server has it, compresses
    -- them several times faster than the default pglz. The stored values are the same.
    IF EXISTS (SELECT FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        PERFORM set_config('default_toast_compression', 'lz4', true);
    END IF;
    -- First each prediction's winning keys, from one pass over its events (f is computed
    -- in a fenced subquery so the aggregation sees narrow rows).
    EXECUTE format($sql$
        CREATE TEMP TABLE rebuild_prediction_groups ON COMMIT DROP AS
        SELECT f.id,
               max(f.job_id::text COLLATE "C")::uuid AS job_id,
               min(f.step) AS step,
               max(f.state_key) AS state_key,
               max(f.logs_key) AS logs_key,
               max(f.output_key) AS output_key,
               fold_key_position(max(f.state_key)) AS state_at,
               fold_key_position(max(f.logs_key)) AS logs_at,
               fold_key_position(max(f.output_key)) AS output_at,
               max(f.model) AS model,
               max(f.version) AS version,
               bool_or(f.data_removed) AS data_removed,
               min(f.created_at) AS created_at,
               min(f.started_at) AS started_at,
               min(f.first_seen_at) AS first_seen_at,
               max(f.updated_at) AS updated_at,
               count(*)::integer AS event_count
        FROM events e
        CROSS JOIN LATERAL (SELECT * FROM prediction_facts(e.stream, e.type, e.data, e.metadata,
                                                           e.position, e.recorded_at)
                            OFFSET 0) f
        WHERE e.type IN ('prediction.submitted', 'replicate.webhook', 'replicate.polled',
                         'prediction.submit_failed')
          AND %s
        GROUP BY f.id
    $sql$, stream_filter(p_stream, 'e')) USING p_stream;
    -- Then the facts of each winning event. One event usually holds the greatest state,
    -- logs and output keys at once: it is read once, and the logs' or output's own winner
    -- is looked up only when it is another event. Winners are a fraction of the events:
    -- each is fetched by position, in position order (so the heap is read front to back),
    -- rather than by hashing every event to find them.
    INSERT INTO predictions
    SELECT g.id, g.job_id, g.step, s.status, s.error,
           CASE WHEN g.logs_at = g.state_at THEN s.logs_tail ELSE l.logs_tail END,
           coalesce(CASE WHEN g.logs_at = g.state_at THEN s.logs_length ELSE l.logs_length END, 0),
           s.metrics,
           CASE WHEN g.output_at = g.state_at THEN s.output ELSE o.output END,
           coalesce(CASE WHEN g.output_at = g.state_at THEN s.output_urls ELSE o.output_urls END,
                    '[]'::jsonb),
           g.model, g.version, g.data_removed, g.created_at, g.started_at, s.completed_at,
           g.first_seen_at, g.updated_at, g.event_count, g.state_key, g.logs_key, g.output_key
    FROM (SELECT * FROM rebuild_prediction_groups ORDER BY state_at OFFSET 0) g
    CROSS JOIN LATERAL (
        SELECT f.*
        FROM events se
        CROSS JOIN LATERAL prediction_facts(se.stream, se.type, se.data, se.metadata,
                                            se.position, se.recorded_at) f
        WHERE se.position = g.state_at
        OFFSET 0) s
    LEFT JOIN LATERAL (
        SELECT f.logs_tail, f.logs_length
        FROM events le
        CROSS JOIN LATERAL prediction_facts(le.stream, le.type, le.data, le.metadata,
                                            le.position, le.recorded_at) f
        WHERE le.position = g.logs_at AND g.logs_at <> g.state_at
        OFFSET 0) l ON true
    LEFT JOIN LATERAL (
        SELECT f.output, f.output_urls
        FROM events oe
        CROSS JOIN LATERAL prediction_facts(oe.stream, oe.type, oe.data, oe.metadata,
                                            oe.position, oe.recorded_at) f
        WHERE oe.position = g.output_at AND g.output_at <> g.state_at
        OFFSET 0) o ON true;
    GET DIAGNOSTICS n = ROW_COUNT;
    DROP TABLE rebuild_prediction_groups;
    PERFORM set_config('default_toast_compression', v_compression, true);
    RETURN n;
END $$;

ALTER FUNCTION rebuild_outputs(text) SET jit = off;

-- Fold one prediction event into predictions: each field group keeps the value whose
-- fold key is greater (see 003_fold.sql); counts add up. Now also says whether the event
-- changed anything a job's derived columns read (job_step_rollups and
-- job_step_output_rollups: job, step, status, error, start and end, output count).
-- The upsert is 003's, unchanged; only the return type and the two reads around it are new.
DROP FUNCTION apply_prediction_event(events);
CREATE FUNCTION apply_prediction_event(e events) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_before record;
    v_after record;
BEGIN
    SELECT p.job_id, p.step, p.status, p.error, p.started_at, p.completed_at,
           jsonb_array_length(p.output_urls) AS outputs
    INTO v_before
    FROM predictions p WHERE p.id = prediction_body(e.type, e.data) ->> 'id';
    INSERT INTO predictions AS p
    SELECT * FROM prediction_facts(e.stream, e.type, e.data, e.metadata, e.position, e.recorded_at)
    ON CONFLICT (id) DO UPDATE SET
        job_id        = greatest(p.job_id, excluded.job_id),
        step          = least(p.step, excluded.step),
        status        = CASE WHEN excluded.state_key > p.state_key THEN excluded.status ELSE p.status END,
        error         = CASE WHEN excluded.state_key > p.state_key THEN excluded.error ELSE p.error END,
        metrics       = CASE WHEN excluded.state_key > p.state_key THEN excluded.metrics ELSE p.metrics END,
        completed_at  = CASE WHEN excluded.state_key > p.state_key THEN excluded.completed_at ELSE p.completed_at END,
        state_key     = greatest(p.state_key, excluded.state_key),
        logs_tail     = CASE WHEN excluded.logs_key > p.logs_key THEN excluded.logs_tail ELSE p.logs_tail END,
        logs_length   = CASE WHEN excluded.logs_key > p.logs_key THEN excluded.logs_length ELSE p.logs_length END,
        logs_key      = greatest(p.logs_key, excluded.logs_key),
        output        = CASE WHEN excluded.output_key > p.output_key THEN excluded.output ELSE p.output END,
        output_urls   = CASE WHEN excluded.output_key > p.output_key THEN excluded.output_urls ELSE p.output_urls END,
        output_key    = greatest(p.output_key, excluded.output_key),
        model         = greatest(p.model, excluded.model),
        version       = greatest(p.version, excluded.version),
        data_removed  = p.data_removed OR excluded.data_removed,
        created_at    = least(p.created_at, excluded.created_at),
        started_at    = least(p.started_at, excluded.started_at),
        first_seen_at = least(p.first_seen_at, excluded.first_seen_at),
        updated_at    = greatest(p.updated_at, excluded.updated_at),
        event_count   = p.event_count + 1
    RETURNING p.job_id, p.step, p.status, p.error, p.started_at, p.completed_at,
              jsonb_array_length(p.output_urls) AS outputs
    INTO v_after;
    RETURN v_before IS DISTINCT FROM v_after;
END $$;

-- One event's mark on its job. job_activity always; the jobs row only with p_derive, and
-- then only when a column changes: its derived columns, computed from the rollups (with
-- the canceled_at this event leaves), its canceled_at and its count of submissions that
-- failed for good.
CREATE FUNCTION touch_job(p_job uuid, e events, p_derive boolean) RETURNS void
LANGUAGE plpgsql AS $$
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
    -- OFFSET 0: the new row is computed once, not once for each use in SET and WHERE.
    UPDATE jobs j
    SET (canceled_at, submit_failures, status, predictions_submitted, predictions_succeeded,
         predictions_failed, outputs_expected, outputs_processed, outputs_failed, outputs, error,
         started_at, completed_at)
      = (d.canceled_at, d.submit_failures, d.status, d.predictions_submitted,
         d.predictions_succeeded, d.predictions_failed, d.outputs_expected, d.outputs_processed,
         d.outputs_failed, d.outputs, d.error, d.started_at, d.completed_at)
    FROM (SELECT c.canceled_at, c.submit_failures, v.*
          FROM (SELECT CASE WHEN e.type = 'job.canceled'
                            THEN least(jc.canceled_at, e.recorded_at)
                            ELSE jc.canceled_at END AS canceled_at,
                       jc.submit_failures + is_final_submit_failure(e.type, e.data)::integer
                           AS submit_failures,
                       jc.predictions_expected, jc.next_step IS NOT NULL AS has_next
                FROM jobs jc WHERE jc.id = p_job) c
          LEFT JOIN job_step_rollups r1 ON r1.job_id = p_job AND r1.step = 1
          LEFT JOIN job_step_output_rollups o1 ON o1.job_id = p_job AND o1.step = 1
          LEFT JOIN job_step_rollups r2 ON r2.job_id = p_job AND r2.step = 2
          LEFT JOIN job_step_output_rollups o2 ON o2.job_id = p_job AND o2.step = 2
          CROSS JOIN LATERAL job_derived_values(c.canceled_at, c.predictions_expected,
                                                c.has_next, r1, o1, r2, o2) v
          OFFSET 0) d
    WHERE j.id = p_job
      AND (j.canceled_at, j.submit_failures, j.status, j.predictions_submitted,
           j.predictions_succeeded, j.predictions_failed, j.outputs_expected, j.outputs_processed,
           j.outputs_failed, j.outputs, j.error, j.started_at, j.completed_at)
          IS DISTINCT FROM
          (d.canceled_at, d.submit_failures, d.status, d.predictions_submitted,
           d.predictions_succeeded, d.predictions_failed, d.outputs_expected, d.outputs_processed,
           d.outputs_failed, d.outputs, d.error, d.started_at, d.completed_at);
END $$;

-- Fold one recorded event into every projection. Called by append_event in the
-- transaction that records the event.
CREATE OR REPLACE FUNCTION apply_event(e events) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := stream_job_id(e.stream);
    v_derive boolean := true;
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
    ELSIF e.type IN ('output.processed', 'output.failed') THEN
        PERFORM apply_output_event(e);
    END IF;
    IF v_job IS NOT NULL THEN
        PERFORM touch_job(v_job, e, coalesce(v_derive, false));
    END IF;
    PERFORM on_event_applied(e);
END $$;

-- PL/pgSQL rather than SQL: a SQL function called on its own (PERFORM, not inlined into a
-- query) is planned again at every call, which cost ~300 µs an output event; PL/pgSQL
-- keeps the plan for the session. Same statement as in 003_fold.sql.
CREATE OR REPLACE FUNCTION apply_output_event(e events) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outputs AS o
    SELECT * FROM output_facts(e.stream, e.type, e.data, e.position, e.recorded_at)
    ON CONFLICT (prediction_id, index) DO UPDATE SET
        (job_id, status, source_url, url, original_url, width, height, bytes, error, detail,
         recorded_at, fold_key)
      = (excluded.job_id, excluded.status, excluded.source_url, excluded.url, excluded.original_url,
         excluded.width, excluded.height, excluded.bytes, excluded.error, excluded.detail,
         excluded.recorded_at, excluded.fold_key)
    WHERE excluded.fold_key > o.fold_key;
END $$;

-- Likewise for the question every job insert's trigger asks (008_dashboard.sql).
CREATE OR REPLACE FUNCTION jobs_feed_listened() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce((SELECT listening_until > now() FROM jobs_feed_listeners), false);
END $$;
