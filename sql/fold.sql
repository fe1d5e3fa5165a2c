-- The fold: how events become the projections (jobs, predictions, outputs, job_activity).
-- The live path (append_event in sql/store.sql -> apply_event, one event at a time) and
-- the rebuild (sql/rebuild.sql, set-based) share every rule below, so they cannot drift
-- apart. Read top to bottom, this file is the rules:
--
--   1. What an event says: its job, its prediction body, its step, its output URLs.
--   2. Order does not matter. Replicate delivers late, twice and out of order, and
--      concurrent transactions commit out of position order. So no projected field
--      depends on arrival order: each field group of a prediction is taken from the event
--      with the greatest *fold key*, a fixed-width text computed from that one event:
--        state_key  (status, error, metrics, completed_at):
--                   status rank | log length | output size | content hash | position
--        logs_key   (logs): log length | hash | position        ('' when there are no logs)
--        output_key (output): output size | hash | position     ('' when there is no output)
--      A terminal status therefore always beats an earlier one, and logs and outputs only
--      grow. The live upsert keeps the greater key; the rebuild takes max(key). The
--      position suffix only breaks ties between byte-identical bodies, and lets the
--      rebuild find the winning event again.
--   3. A prediction: the facts of one event, folded by keeping the greater key.
--   4. An output: a processed result beats a failed one.
--   5. A job: what job.created says, then its status and counts follow from the rollups
--      of its predictions and outputs, step by step.
--   6. The live path: one event folded into every projection, in the transaction that
--      records it.
--
-- Re-applied as a whole by `flask --app service migrate` whenever this file changes (see
-- docs/sql.md): every statement here must be safe to run again.


-- 1. What an event says -------------------------------------------------------------------
-- The job a stream belongs to: streams are job ids (uuids) or, for orphans, prediction ids.
-- A job id is a canonical uuid: 36 characters, dashes at 9, 14, 19 and 24, lowercase hex
-- elsewhere. Said without a counted regex (^[0-9a-f]{8}-...), which costs ~5 µs a call and
-- is called for every event a rebuild reads: the pattern fixes length and dash positions,
-- the regex allows only hex and dashes, and 32 non-dashes leave no other dash.
CREATE OR REPLACE FUNCTION stream_job_id(stream text) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN stream LIKE '________-____-____-____-____________'
    AND stream ~ '^[-0-9a-f]*$' AND octet_length(replace(stream, '-', '')) = 32
    THEN stream::uuid END;

-- A number from untrusted text, or NULL when it is not a small non-negative integer.
CREATE OR REPLACE FUNCTION small_int(value text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN value ~ '^[0-9]{1,6}$' THEN value::integer END;

-- Text to timestamptz (stable, not immutable: the cast reads the session's settings,
-- and a function must not claim less volatility than its body or it is not inlined).
CREATE OR REPLACE FUNCTION text_timestamptz(value text) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
RETURN nullif(value, '')::timestamptz;

-- The prediction object an event carries, if any. A submission that failed for good
-- stands in for the prediction it could not create: a failed prediction of its step,
-- named by the event (unsubmitted-<job>-<step>-<index>), so it counts and shows its error.
-- STABLE, not IMMUTABLE: jsonb_build_object is stable, and a function claiming less
-- volatility than its body is not inlined (then it runs as a call per event, ~10x slower).
CREATE OR REPLACE FUNCTION prediction_body(type text, data jsonb) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE type
    WHEN 'prediction.submitted' THEN data -> 'prediction'
    WHEN 'replicate.webhook' THEN data
    WHEN 'replicate.polled' THEN data
    WHEN 'prediction.submit_failed' THEN CASE WHEN data -> 'final' = 'true'::jsonb
        THEN jsonb_build_object('id', data ->> 'prediction_id', 'status', 'failed',
                                'error', data ->> 'error') END END;

-- The step of a job a prediction belongs to: our own record says it (of a prediction
-- submitted, or of one a refused submission stands in for), and a webhook's query string
-- (?job=<id>&step=<n>) repeats it.
CREATE OR REPLACE FUNCTION prediction_step(type text, data jsonb, metadata jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN small_int(CASE WHEN type IN ('prediction.submitted', 'prediction.submit_failed') THEN data ->> 'step'
                      ELSE metadata -> 'query' ->> 'step' END);

-- Every URL in an output, however nested (string, list, list of lists, dict of file objects).
CREATE OR REPLACE FUNCTION output_urls(output jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(jsonb_path_query_array(output,
    'strict $.** ? (@.type() == "string" && (@ starts with "https://" || @ starts with "http://" || @ starts with "data:"))'),
    '[]'::jsonb);

-- A submission that failed for good (a permanent refusal, or every retry round used up)
-- takes the place of the prediction it could not create.
CREATE OR REPLACE FUNCTION is_final_submit_failure(type text, data jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN type = 'prediction.submit_failed' AND coalesce(data -> 'final' = 'true'::jsonb, false);


-- 2. Fold keys: the greatest wins, whatever the order -------------------------------------
-- The first part of state_key: a later status of Replicate's lifecycle ranks higher, and
-- succeeded ranks highest of the terminal ones.
CREATE OR REPLACE FUNCTION prediction_status_rank(status text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE status
    WHEN 'starting' THEN 1 WHEN 'processing' THEN 2
    WHEN 'aborted' THEN 3 WHEN 'canceled' THEN 4 WHEN 'failed' THEN 5 WHEN 'succeeded' THEN 6
    ELSE 0 END;

-- One piece of a fold key: a number as fixed-width text, so text order is number order.
CREATE OR REPLACE FUNCTION fold_key_part(n bigint, width integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN lpad(n::text, width, '0');

-- A content hash as fixed-width text (16 hex digits).
CREATE OR REPLACE FUNCTION fold_key_hash(h bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN lpad(to_hex(h), 16, '0');

-- The event that produced a winning key.
CREATE OR REPLACE FUNCTION fold_key_position(fold_key text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN nullif(right(fold_key, 19), '')::bigint;


-- 3. A prediction -------------------------------------------------------------------------
-- What one event says about its prediction, as a predictions row (event_count 1), with
-- its three fold keys. Used by the live upsert directly and by the rebuild for each event
-- (its keys) and each winning event (its fields).
--
-- Each costly value is computed once, as a FROM item that is an expression (a function
-- scan: `FROM coalesce(x) AS v(x)`). body: the prediction object, detoasted once (by
-- '{}' ||), since the jsonb operators would otherwise decompress a stored body again for
-- every field they read. n: the log length in characters, read in both keys and costly on
-- long logs. The logs, status and output are read from body where they are used:
-- extracting a field of a detoasted body is cheaper than a third function scan (measured:
-- +27% CPU per event with three). A tail of logs that are short already is the logs:
-- right() would count characters.
--
-- Function scans rather than subqueries fenced with OFFSET 0: inlined into a query over
-- events, such subqueries are LATERAL subqueries that refer to the event's columns, and
-- PostgreSQL (15 at least) plans a subquery with such outer references as
-- parallel-unsafe, which kept the rebuild's first pass (most of a replay's time) in one
-- process. A function scan is evaluated once per event too, and may run in a worker.
--
-- A trap avoided: the output size in the fold keys is pg_column_size of the output as `->`
-- returns it (a 4-byte varlena header). A value that went through a function scan's tuple
-- store may come back with a 1-byte header, 3 bytes smaller; so the output is never put
-- in a function scan, and its size is always taken from `->` directly.
CREATE OR REPLACE FUNCTION prediction_facts(
    stream text, type text, data jsonb, metadata jsonb, pos bigint, recorded_at timestamptz
) RETURNS SETOF predictions
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT body.b ->> 'id',
           stream_job_id(stream),
           prediction_step(type, data, metadata),
           body.b ->> 'status',
           body.b ->> 'error',
           CASE WHEN octet_length(body.b ->> 'logs') <= 4000 THEN body.b ->> 'logs'
                ELSE right(body.b ->> 'logs', 4000) END,
           coalesce(n.logs_length, 0),
           CASE WHEN jsonb_typeof(body.b -> 'metrics') = 'object' THEN body.b -> 'metrics' ELSE '{}'::jsonb END,
           nullif(body.b -> 'output', 'null'::jsonb),
           output_urls(nullif(body.b -> 'output', 'null'::jsonb)),
           body.b ->> 'model',
           body.b ->> 'version',
           coalesce(body.b -> 'data_removed' = 'true'::jsonb, false),
           text_timestamptz(body.b ->> 'created_at'),
           text_timestamptz(body.b ->> 'started_at'),
           text_timestamptz(body.b ->> 'completed_at'),
           recorded_at,
           recorded_at,
           1,
           prediction_status_rank(body.b ->> 'status')::text
               || fold_key_part(coalesce(n.logs_length, 0), 10)
               || fold_key_part(coalesce(pg_column_size(nullif(body.b -> 'output', 'null'::jsonb)), 0), 10)
               || fold_key_hash(jsonb_hash_extended(body.b, 0))
               || fold_key_part(pos, 19),
           CASE WHEN body.b ->> 'logs' IS NULL THEN '' ELSE
               fold_key_part(n.logs_length, 10)
               || fold_key_hash(hashtextextended(body.b ->> 'logs', 0))
               || fold_key_part(pos, 19) END,
           CASE WHEN nullif(body.b -> 'output', 'null'::jsonb) IS NULL THEN '' ELSE
               fold_key_part(pg_column_size(nullif(body.b -> 'output', 'null'::jsonb)), 10)
               || fold_key_hash(jsonb_hash_extended(nullif(body.b -> 'output', 'null'::jsonb), 0))
               || fold_key_part(pos, 19) END,
           false  -- superseded: only a job.retried event sets it (apply_event, rebuild_predictions)
    FROM coalesce('{}'::jsonb || prediction_body(type, data)) AS body(b)
    -- logs_length: a webhook's event keeps the logs' tail and their whole length (webhook_facts)
    CROSS JOIN LATERAL coalesce(CASE WHEN body.b ->> 'logs_length' ~ '^[0-9]{1,9}$'
                                     THEN (body.b ->> 'logs_length')::integer END,
                                length(body.b ->> 'logs')) AS n(logs_length)
    WHERE body.b ->> 'id' IS NOT NULL
$$;

-- Fold one prediction event into predictions: each field group keeps the value whose fold
-- key is greater; job and step keep the greater and smaller, the earliest times and the
-- latest update win, counts add up. Returns the prediction's status after the event when
-- the event changed something a job's derived columns read (job_step_rollups and
-- job_step_output_rollups: job, step, status, error, start and end, output count), NULL
-- when it changed none of that (most of Replicate's webhooks: more logs), so apply_event
-- knows whether the job and the post-event hook have anything to do.
CREATE OR REPLACE FUNCTION apply_prediction_event(e events) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_before record;
    v_after record;
    v_new boolean;
BEGIN
    SELECT p.job_id, p.step, p.status, p.error, p.started_at, p.completed_at,
           jsonb_array_length(p.output_urls) AS outputs
    INTO v_before
    FROM predictions p WHERE p.id = prediction_body(e.type, e.data) ->> 'id';
    v_new := NOT FOUND;
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
    -- A prediction first heard of after a job.retried that names it (events recorded out of
    -- order) is superseded as a rebuild would make it. One probe of a small partial index,
    -- only for a prediction's first event, and only in the partitions between the job's
    -- job.created and this event (a job.retried is recorded only while its job exists):
    -- unbounded, the probe was one index scan per partition of events, at every new
    -- prediction (at 20M events, 24 of them: a third of an append's CPU time more than at
    -- 1M). An orphan prediction has no job.retried to look for. Two IFs, not one AND: the
    -- probe's query is started (its partitions locked, the bounds computed to prune them)
    -- whenever its IF is evaluated, whatever the AND's first terms say.
    IF v_new AND v_after.job_id IS NOT NULL THEN
        IF EXISTS (SELECT FROM events r
                   WHERE r.stream = e.stream AND r.type = 'job.retried'
                     AND r.position BETWEEN job_first_position(e.stream) AND e.position
                     AND r.data -> 'predictions' ? (prediction_body(e.type, e.data) ->> 'id')
                     AND stream_job_id(r.stream) = v_after.job_id) THEN
            UPDATE predictions SET superseded = true WHERE id = prediction_body(e.type, e.data) ->> 'id';
        END IF;
    END IF;
    IF v_before IS DISTINCT FROM v_after THEN
        RETURN v_after.status;
    END IF;
    RETURN NULL;
END $$;


-- 4. An output ----------------------------------------------------------------------------
-- What one output.processed / output.failed event says, as an outputs row. Its fold key:
-- processed (1) beats failed (0), since a later retry may succeed; then hash and position.
CREATE OR REPLACE FUNCTION output_facts(
    stream text, type text, data jsonb, pos bigint, recorded_at timestamptz
) RETURNS SETOF outputs
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT data ->> 'prediction_id',
           small_int(data ->> 'index'),
           stream_job_id(stream),
           CASE type WHEN 'output.processed' THEN 'processed' ELSE 'failed' END,
           data ->> 'source_url',
           data ->> 'url',
           data ->> 'original_url',
           small_int(data ->> 'width'),
           small_int(data ->> 'height'),
           CASE WHEN data ->> 'bytes' ~ '^[0-9]{1,15}$' THEN (data ->> 'bytes')::bigint END,
           data ->> 'error',
           data - ARRAY['prediction_id', 'index', 'source_url', 'url', 'original_url',
                        'width', 'height', 'bytes', 'error'],
           recorded_at,
           CASE type WHEN 'output.processed' THEN '1' ELSE '0' END
               || fold_key_hash(jsonb_hash_extended(data, 0))
               || fold_key_part(pos, 19)
    WHERE type IN ('output.processed', 'output.failed')
      AND data ->> 'prediction_id' IS NOT NULL
      AND small_int(data ->> 'index') IS NOT NULL
$$;

-- Fold one output event into outputs: the row with the greater fold key stays.
-- PL/pgSQL rather than SQL: a SQL function called on its own (PERFORM, not inlined into a
-- query) is planned again at every call, which cost ~300 µs an output event; PL/pgSQL
-- keeps the plan for the session.
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


-- 5. A job --------------------------------------------------------------------------------
-- A job's cancel_after from untrusted text: a positive number of seconds up to a year,
-- else NULL (no deadline) rather than an error that would stop a replay.
CREATE OR REPLACE FUNCTION cancel_after_seconds(value text) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN value ~ '^[0-9]{1,8}(\.[0-9]{1,6})?$' AND value::numeric > 0
                 AND value::numeric <= 31536000 THEN value::numeric END;

-- A job as job.created describes it, with what the caller knows of its stream (when it
-- was canceled, how many submissions failed for good). The owner is kept when it is a
-- canonical uuid (stream_job_id checks exactly that), else NULL rather than an error that
-- would stop a replay. predictions_expected counts every prediction the job runs: `count`
-- in step 1, and one more for a second step (`then`). The derived columns start as
-- "pending, nothing counted". The deadline is job.created's time plus its cancel_after
-- (seconds, as the jobs API records it), if any; STABLE because adding an interval to a
-- timestamptz is.
CREATE OR REPLACE FUNCTION job_facts(
    stream text, data jsonb, created_at timestamptz, canceled_at timestamptz, submit_failures integer
) RETURNS SETOF jobs
LANGUAGE sql STABLE PARALLEL SAFE
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
           'pending', coalesce(small_int(data ->> 'count'), 1) + (data -> 'then' IS NOT NULL)::integer,
           0, 0, 0, submit_failures, 0, 0, 0, '[]'::jsonb, NULL::text,
           canceled_at, created_at, NULL::timestamptz, NULL::timestamptz,
           stream_job_id(data ->> 'owner_id'),
           created_at + cancel_after_seconds(data ->> 'cancel_after') * interval '1 second'
    WHERE stream_job_id(stream) IS NOT NULL
$$;

-- What a job row records about its stream of events as a whole. The live path reads it for
-- one stream when job.created arrives (so events that came before job.created are counted
-- the same way) and then adds each event. The rebuild computes the same aggregates a window
-- of positions at a time (sql/rebuild.sql: rebuild_scan): keep the two alike (the replay
-- tests compare what each gives).
CREATE OR REPLACE VIEW job_stream_stats AS
SELECT stream,
       count(*)::integer AS event_count,
       max(position) AS last_position,
       max(recorded_at) AS updated_at,
       min(recorded_at) FILTER (WHERE type = 'job.canceled') AS canceled_at,
       count(*) FILTER (WHERE is_final_submit_failure(type, data))::integer AS submit_failures,
       max(recorded_at) FILTER (WHERE type = 'job.retried') AS retried_at
FROM events
GROUP BY stream;

-- Each step of a job, from its predictions: how many were submitted, started, succeeded
-- and failed (canceled and aborted count as failed), the outputs the succeeded ones
-- promise, when the step started and ended, and an error. A prediction a retry submitted
-- again (superseded) stays in the job's history but counts in none of this: its
-- replacement does.
--
-- The rollups are functions, and the views below are their rows: a view is bound to the
-- tables it was created over, while a LANGUAGE sql function with a string body is parsed
-- where it is used. A replay rebuilds into temporary tables that shadow predictions and
-- outputs in its own session (service/scratch.py), and the jobs it derives must read those
-- rows. STABLE and a single SELECT, so the planner inlines them: the views plan as the
-- plain views did (the live path's statements are unchanged).
CREATE OR REPLACE FUNCTION job_step_rollups_rows()
RETURNS TABLE (job_id uuid, step integer, submitted integer, started integer, succeeded integer,
               failed integer, outputs_expected integer, started_at timestamptz,
               completed_at timestamptz, error text)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT job_id,
           coalesce(step, 1),
           count(*)::integer,
           count(*) FILTER (WHERE status <> 'starting')::integer,
           count(*) FILTER (WHERE status = 'succeeded')::integer,
           count(*) FILTER (WHERE status IN ('failed', 'canceled', 'aborted'))::integer,
           coalesce(sum(jsonb_array_length(output_urls)) FILTER (WHERE status = 'succeeded'), 0)::integer,
           min(started_at),
           max(completed_at),
           min(error) FILTER (WHERE status IN ('failed', 'canceled', 'aborted'))
    FROM predictions
    WHERE job_id IS NOT NULL AND NOT superseded  -- a retried prediction counts no more
    GROUP BY job_id, coalesce(step, 1)
$$;

CREATE OR REPLACE VIEW job_step_rollups AS SELECT * FROM job_step_rollups_rows();

-- Each step of a job, from its outputs: how many were processed and failed, when the last
-- one was recorded, the processed ones as the job shows them, and an error.
CREATE OR REPLACE FUNCTION job_step_output_rollups_rows()
RETURNS TABLE (job_id uuid, step integer, processed integer, failed integer,
               completed_at timestamptz, outputs jsonb, error text)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT o.job_id,
           coalesce(p.step, 1),
           count(*) FILTER (WHERE o.status = 'processed')::integer,
           count(*) FILTER (WHERE o.status = 'failed')::integer,
           max(o.recorded_at),
           coalesce(jsonb_agg(jsonb_build_object(
                        'prediction_id', o.prediction_id, 'index', o.index, 'step', coalesce(p.step, 1),
                        'source_url', o.source_url, 'url', o.url, 'width', o.width, 'height', o.height)
                    ORDER BY o.prediction_id, o.index) FILTER (WHERE o.status = 'processed'),
                    '[]'::jsonb),
           min(o.error) FILTER (WHERE o.status = 'failed')
    FROM outputs o
    LEFT JOIN predictions p ON p.id = o.prediction_id
    WHERE o.job_id IS NOT NULL
    GROUP BY o.job_id, coalesce(p.step, 1)
$$;

CREATE OR REPLACE VIEW job_step_output_rollups AS SELECT * FROM job_step_output_rollups_rows();

-- Where one step of a job stands: waiting, running, post-processing, or settled with
-- some results (done) or none (failed). `expected` is how many predictions the step needs.
CREATE OR REPLACE FUNCTION job_step_state(
    expected integer, submitted integer, started integer, succeeded integer, failed integer,
    outputs_expected integer, processed integer, outputs_failed integer
) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN submitted = 0 AND expected > 0 THEN 'pending'
    WHEN succeeded + failed < expected THEN CASE WHEN started > 0 THEN 'running' ELSE 'queued' END
    WHEN succeeded = 0 THEN 'failed'
    WHEN processed + outputs_failed < outputs_expected THEN 'processing'
    WHEN outputs_expected > 0 AND processed = 0 THEN 'failed'
    ELSE 'done' END;

-- A job's status from its steps. With a second step (`then`), one step-2 prediction runs
-- once step 1 is done, its input referring to step 1's processed outputs; the job is done
-- when step 2 is.
-- Written so that each argument appears once (tests/test_fold_rebuild.py checks it
-- against the plain CASE for every input): an inlined SQL function repeats an argument's
-- whole expression at every use, and job_derived_values passes it job_step_state's.
-- nullif says "first step not done" without repeating first_step, and the CASE over
-- next_step names all six states job_step_state can give.
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

-- Whether a job's predictions were stopped by its deadline (see job_derived_values). PL/pgSQL,
-- so it is opaque to the planner: as a subquery in job_derived_values' inlined body it made
-- every plan of touch_job's call a custom plan (its generic plan priced the subquery, a
-- custom plan folds it away when the job has no deadline), and planning that call again at
-- every append cost more than half as much as the rest of the append (pg_stat_statements:
-- ~520 us a call). Called only for a failed job with a deadline.
CREATE OR REPLACE FUNCTION job_stopped_by_deadline(p_job uuid) RETURNS boolean
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    RETURN EXISTS (SELECT FROM predictions p
                   WHERE p.job_id = p_job AND NOT p.superseded
                     AND (p.status IN ('aborted', 'canceled') OR p.error = 'deadline exceeded'));
END $$;

-- Every derived column of a job from its base row and the rollups of its two steps.
-- Shared by touch_job (the live path, one job at a time) and rebuild_jobs (every job at
-- once). An inlinable SQL function: its body becomes part of the calling query. The counts
-- are taken once (n, pulled up into the caller, where a rebuild's whole-row arguments
-- become plain columns) and the status once, in a subquery that OFFSET 0 keeps whole, so
-- status, error and completed_at refer to its result rather than repeating the whole
-- status expression (both steps' states). predictions_expected is step 1's: the job's
-- column less the one prediction of a second step.
--
-- A failed job with a deadline whose predictions were stopped by it (aborted: Replicate
-- never started one before its Cancel-After; canceled: one was running; or not sent at all,
-- a stand-in failing with 'deadline exceeded') gives the reason 'deadline exceeded'. Only a
-- failed job with a deadline looks at its predictions for this (job_stopped_by_deadline), so
-- the lookup is rare.
-- A job without a deadline keeps the error it had: a canceled prediction there was
-- canceled by someone else (at replicate.com, say).
DROP FUNCTION IF EXISTS job_derived_values(timestamptz, integer, boolean, job_step_rollups,
    job_step_output_rollups, job_step_rollups, job_step_output_rollups);
CREATE OR REPLACE FUNCTION job_derived_values(
    canceled_at timestamptz, predictions_expected integer, has_next boolean,
    r1 job_step_rollups, o1 job_step_output_rollups,
    r2 job_step_rollups, o2 job_step_output_rollups,
    deadline timestamptz DEFAULT NULL
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
           CASE WHEN st.status <> 'failed' THEN NULL
                WHEN deadline IS NOT NULL AND job_stopped_by_deadline(coalesce(r1.job_id, r2.job_id))
                    THEN 'deadline exceeded'
                ELSE coalesce(r2.error, o2.error, r1.error, o1.error, 'no prediction succeeded') END,
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


-- 6. The live path ------------------------------------------------------------------------
-- One event's mark on its job. job_activity always; the jobs row only with p_derive, and
-- then only when a column changes: its derived columns (job_derived_values over the two
-- steps' rollups, with the canceled_at this event leaves), its canceled_at and its count
-- of submissions that failed for good.
--
-- In statements that are each quick to start (measured with callgrind: starting one
-- UPDATE that joined the four grouped views cost more than running it): the job's own
-- columns, both steps' prediction rollups in one grouped read, the output rollups only
-- when the job has outputs, then an UPDATE by primary key that writes only when a column
-- changes. A job with no output rows has outputs_processed and outputs_failed both 0
-- (every output event derives them), so for it the output rollups are known to be empty
-- and are not read. The rollups are handed to job_derived_values as composite variables,
-- not array elements: its inlined body reads each argument's fields many times over, and
-- every read of r1[1] would be a subscript and then a field (~4% of an append).
CREATE OR REPLACE FUNCTION touch_job(p_job uuid, e events, p_derive boolean) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    r1 job_step_rollups[];  -- each a one-element array, or NULL: a record variable cannot
    r2 job_step_rollups[];  -- share an INTO list
    o1 job_step_output_rollups[];
    o2 job_step_output_rollups[];
    d record;
    -- each step's rollups as one composite, for job_derived_values (see above)
    v_r1 job_step_rollups;
    v_r2 job_step_rollups;
    v_o1 job_step_output_rollups;
    v_o2 job_step_output_rollups;
BEGIN
    INSERT INTO job_activity AS a (job_id, event_count, first_position, last_position, updated_at)
    VALUES (p_job, 1, CASE WHEN e.type = 'job.created' THEN e.position END, e.position, e.recorded_at)
    ON CONFLICT (job_id) DO UPDATE SET
        event_count    = a.event_count + 1,
        first_position = least(a.first_position, excluded.first_position),  -- NULLs ignored
        last_position  = greatest(a.last_position, excluded.last_position),
        updated_at    = greatest(a.updated_at, excluded.updated_at);
    IF NOT p_derive THEN
        RETURN;
    END IF;
    SELECT CASE WHEN e.type = 'job.canceled' THEN least(j.canceled_at, e.recorded_at)
                ELSE j.canceled_at END AS canceled_at,
           j.submit_failures + is_final_submit_failure(e.type, e.data)::integer AS submit_failures,
           j.predictions_expected - (j.next_step IS NOT NULL)::integer AS first_step_expected,
           j.next_step IS NOT NULL AS has_next,
           j.deadline,
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
    v_r1 := r1[1];
    v_r2 := r2[1];
    v_o1 := o1[1];
    v_o2 := o2[1];
    SELECT * INTO d FROM job_derived_values(c.canceled_at, c.first_step_expected, c.has_next,
                                            v_r1, v_o1, v_r2, v_o2, c.deadline);
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

-- Fold one recorded event into every projection. Called by append_event in the
-- transaction that records the event. on_event_applied (sql/queue.sql) enqueues the work
-- an event calls for, and does something for two kinds of event only: a Replicate webhook
-- or poll that leaves its prediction succeeded (post-process its outputs) and an output
-- event (submit a job's second step once its first is done); it is not called for the
-- others, nor for orphans, nor for a prediction event that changed nothing a job reads.
-- What it does is idempotent, so a repeat of news it already acted on may skip it.
CREATE OR REPLACE FUNCTION apply_event(e events) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := stream_job_id(e.stream);
    v_derive boolean := true;
    v_hook boolean := false;
    v_status text;
BEGIN
    IF e.type = 'job.created' THEN
        -- Events recorded before job.created (they left a job_activity row) count as they
        -- would in a rebuild, and may have made predictions or outputs of this job: then its
        -- columns are derived from them. With none (the usual case), job_facts' row is
        -- already what the derivation gives (pending, nothing counted), and it is skipped;
        -- and the stream's statistics are those of this one event (not canceled, no
        -- submission refused), so the stream is not read: that read is an index probe in
        -- every partition of events (24 at 20M events).
        v_derive := EXISTS (SELECT FROM job_activity a WHERE a.job_id = v_job);
        IF v_derive THEN
            INSERT INTO jobs
            SELECT j.* FROM job_stream_stats s
            CROSS JOIN LATERAL job_facts(e.stream, e.data, e.recorded_at, s.canceled_at,
                                         s.submit_failures) j
            WHERE s.stream = e.stream
            ON CONFLICT (id) DO NOTHING
            RETURNING true INTO v_derive;  -- NULL: no new row
        ELSE
            INSERT INTO jobs
            SELECT j.* FROM job_facts(e.stream, e.data, e.recorded_at, NULL::timestamptz, 0) j
            ON CONFLICT (id) DO NOTHING
            RETURNING predictions_expected - (next_step IS NOT NULL)::integer < 1
                INTO v_derive;  -- NULL: no new row
        END IF;
    ELSIF e.type IN ('prediction.submitted', 'replicate.webhook', 'replicate.polled',
                     'prediction.submit_failed') THEN
        v_status := apply_prediction_event(e);
        v_derive := v_status IS NOT NULL;
        -- on_event_applied's only work for a prediction event: post-process the outputs
        -- of a prediction that has succeeded (its query asks for status 'succeeded')
        v_hook := v_status = 'succeeded' AND e.type IN ('replicate.webhook', 'replicate.polled');
    ELSIF e.type IN ('output.processed', 'output.failed') THEN
        PERFORM apply_output_event(e);
        v_hook := true;  -- a job's first step may be done: submit the second
    ELSIF e.type = 'job.retried' THEN
        -- the predictions it submits again stay, superseded; the job counts their
        -- replacements, so it is unfinished again (rebuild_predictions does the same)
        UPDATE predictions SET superseded = true
        WHERE job_id = v_job AND NOT superseded
          AND id IN (SELECT jsonb_array_elements_text(e.data -> 'predictions'));
        -- a job with a deadline gets its cancel_after again from the latest retry, or the
        -- round would not be sent at all (rebuild_jobs: job_stream_stats.retried_at). A
        -- job.retried is recorded only while the job's row exists and is locked, so it
        -- never precedes job.created. The cancel_after is job.created's: the deadline less
        -- created_at is it only until a first retry has moved the deadline.
        UPDATE jobs SET deadline = greatest(deadline, e.recorded_at + coalesce(
            (SELECT cancel_after_seconds(c.data ->> 'cancel_after') * interval '1 second'
             FROM events c
             WHERE c.position = job_first_position(e.stream) AND c.stream = e.stream
               AND c.type = 'job.created'),
            deadline - created_at))
        WHERE id = v_job AND deadline IS NOT NULL;
    END IF;
    IF v_job IS NOT NULL THEN
        PERFORM touch_job(v_job, e, coalesce(v_derive, false));
    END IF;
    IF v_hook AND v_job IS NOT NULL THEN  -- the hook has nothing to do for an orphan
        PERFORM on_event_applied(e);
    END IF;
END $$;
