-- The fold: how events become projections. The live path (append_event → apply_event,
-- one event at a time) and the rebuild (rebuild_projections, set-based) share every
-- rule below, so they cannot drift apart.
--
-- Order independence. Replicate delivers late, twice and out of order, and concurrent
-- transactions commit out of position order. So no projected field depends on arrival
-- order: each field group of a prediction is taken from the event with the greatest
-- *fold key*, a fixed-width text computed from that one event:
--   state_key  (status, error, metrics, completed_at):
--              status rank | log length | output size | content hash | position
--   logs_key   (logs): log length | hash | position        ('' when there are no logs)
--   output_key (output): output size | hash | position     ('' when there is no output)
-- A terminal status therefore always beats an earlier one, and logs and outputs only
-- grow. The live upsert keeps the greater key; the rebuild takes max(key). The position
-- suffix only breaks ties between byte-identical bodies, and lets the rebuild find the
-- winning event again.

CREATE FUNCTION prediction_status_rank(status text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE status
    WHEN 'starting' THEN 1 WHEN 'processing' THEN 2
    WHEN 'aborted' THEN 3 WHEN 'canceled' THEN 4 WHEN 'failed' THEN 5 WHEN 'succeeded' THEN 6
    ELSE 0 END;

-- One piece of a fold key: a number as fixed-width text, so text order is number order.
CREATE FUNCTION fold_key_part(n bigint, width integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN lpad(n::text, width, '0');

CREATE FUNCTION fold_key_hash(h bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN lpad(to_hex(h), 16, '0');

-- The event that produced a winning key.
CREATE FUNCTION fold_key_position(fold_key text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN nullif(right(fold_key, 19), '')::bigint;

-- The job a stream belongs to: streams are job ids (uuids) or, for orphans, prediction ids.
-- A job id is a canonical uuid: 36 characters, dashes at 9, 14, 19 and 24, lowercase hex
-- elsewhere. Said without a counted regex (^[0-9a-f]{8}-...), which costs ~5 µs a call and
-- is called for every event a rebuild reads: the pattern fixes length and dash positions,
-- the regex allows only hex and dashes, and 32 non-dashes leave no other dash.
CREATE FUNCTION stream_job_id(stream text) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN stream LIKE '________-____-____-____-____________'
    AND stream ~ '^[-0-9a-f]*$' AND octet_length(replace(stream, '-', '')) = 32
    THEN stream::uuid END;

-- The prediction object an event carries, if any. A submission that failed for good
-- stands in for the prediction it could not create: a failed prediction of its step,
-- named by the event (unsubmitted-<job>-<step>-<index>), so it counts and shows its error.
-- STABLE, not IMMUTABLE: jsonb_build_object is stable, and a function claiming less
-- volatility than its body is not inlined (then it runs as a call per event, ~10x slower).
CREATE FUNCTION prediction_body(type text, data jsonb) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE type
    WHEN 'prediction.submitted' THEN data -> 'prediction'
    WHEN 'replicate.webhook' THEN data
    WHEN 'replicate.polled' THEN data
    WHEN 'prediction.submit_failed' THEN CASE WHEN data -> 'final' = 'true'::jsonb
        THEN jsonb_build_object('id', data ->> 'prediction_id', 'status', 'failed',
                                'error', data ->> 'error') END END;

-- A number from untrusted text, or NULL when it is not a small non-negative integer.
CREATE FUNCTION small_int(value text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN value ~ '^[0-9]{1,6}$' THEN value::integer END;

-- The step of a job a prediction belongs to: our own record says it, and a webhook's
-- query string (?job=<id>&step=<n>) repeats it.
CREATE FUNCTION prediction_step(type text, data jsonb, metadata jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN small_int(CASE WHEN type = 'prediction.submitted' THEN data ->> 'step'
                      ELSE metadata -> 'query' ->> 'step' END);

-- Every URL in an output, however nested (string, list, list of lists, dict of file objects).
CREATE FUNCTION output_urls(output jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(jsonb_path_query_array(output,
    'strict $.** ? (@.type() == "string" && (@ starts with "https://" || @ starts with "http://" || @ starts with "data:"))'),
    '[]'::jsonb);

-- Text to timestamptz (stable, not immutable: the cast reads the session's settings,
-- and a function must not claim less volatility than its body or it is not inlined).
CREATE FUNCTION text_timestamptz(value text) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
RETURN nullif(value, '')::timestamptz;

-- What one event says about its prediction, as a predictions row (event_count 1).
-- Used by the live upsert directly and by the rebuild for each winning event.
--
-- Each costly value is computed once, in a subquery that OFFSET 0 keeps from being
-- flattened into its uses (flattened, every use repeats the work): the body, which
-- '{}' || detoasts once (the jsonb operators would otherwise decompress a large stored
-- body again for every field they read), then its logs and output, then the log length.
-- A tail of logs that are short already is the logs: right() would count characters.
CREATE FUNCTION prediction_facts(
    stream text, type text, data jsonb, metadata jsonb, pos bigint, recorded_at timestamptz
) RETURNS SETOF predictions
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT x.b ->> 'id',
           stream_job_id(stream),
           prediction_step(type, data, metadata),
           x.status,
           x.b ->> 'error',
           CASE WHEN octet_length(x.logs) <= 4000 THEN x.logs ELSE right(x.logs, 4000) END,
           coalesce(x.logs_length, 0),
           CASE WHEN jsonb_typeof(x.b -> 'metrics') = 'object' THEN x.b -> 'metrics' ELSE '{}'::jsonb END,
           x.output,
           output_urls(x.output),
           x.b ->> 'model',
           x.b ->> 'version',
           coalesce(x.b -> 'data_removed' = 'true'::jsonb, false),
           text_timestamptz(x.b ->> 'created_at'),
           text_timestamptz(x.b ->> 'started_at'),
           text_timestamptz(x.b ->> 'completed_at'),
           recorded_at,
           recorded_at,
           1,
           prediction_status_rank(x.status)::text
               || fold_key_part(coalesce(x.logs_length, 0), 10)
               || fold_key_part(coalesce(x.output_size, 0), 10)
               || fold_key_hash(jsonb_hash_extended(x.b, 0))
               || fold_key_part(pos, 19),
           CASE WHEN x.logs IS NULL THEN '' ELSE
               fold_key_part(x.logs_length, 10)
               || fold_key_hash(hashtextextended(x.logs, 0))
               || fold_key_part(pos, 19) END,
           CASE WHEN x.output IS NULL THEN '' ELSE
               fold_key_part(x.output_size, 10)
               || fold_key_hash(jsonb_hash_extended(x.output, 0))
               || fold_key_part(pos, 19) END
    FROM (SELECT v.*, length(v.logs) AS logs_length
          FROM (SELECT body.b, body.b ->> 'status' AS status, body.b ->> 'logs' AS logs,
                       nullif(body.b -> 'output', 'null'::jsonb) AS output,
                       pg_column_size(nullif(body.b -> 'output', 'null'::jsonb)) AS output_size
                FROM (SELECT '{}'::jsonb || prediction_body(type, data) AS b OFFSET 0) AS body
                OFFSET 0) AS v
          OFFSET 0) AS x
    WHERE x.b ->> 'id' IS NOT NULL
$$;

-- What one output.processed / output.failed event says, as an outputs row.
-- A processed result beats a failed one (a later retry may succeed).
CREATE FUNCTION output_facts(
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

-- A job as job.created describes it, with the event statistics the caller knows.
CREATE FUNCTION job_facts(
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
           updated_at, last_position, event_count
    WHERE stream_job_id(stream) IS NOT NULL
$$;

-- A submission that failed for good (a permanent refusal, or every retry round used up)
-- takes the place of the prediction it could not create.
CREATE FUNCTION is_final_submit_failure(type text, data jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN type = 'prediction.submit_failed' AND coalesce(data -> 'final' = 'true'::jsonb, false);

-- What a job row records about its stream of events as a whole. The rebuild reads it for
-- every stream; the live path reads it for one stream when job.created arrives (so events
-- that came before job.created are counted the same way) and then adds each event.
CREATE VIEW job_stream_stats AS
SELECT stream,
       count(*)::integer AS event_count,
       max(position) AS last_position,
       max(recorded_at) AS updated_at,
       min(recorded_at) FILTER (WHERE type = 'job.canceled') AS canceled_at,
       count(*) FILTER (WHERE is_final_submit_failure(type, data))::integer AS submit_failures
FROM events
GROUP BY stream;

CREATE VIEW job_step_rollups AS
SELECT job_id,
       coalesce(step, 1) AS step,
       count(*)::integer AS submitted,
       count(*) FILTER (WHERE status <> 'starting')::integer AS started,
       count(*) FILTER (WHERE status = 'succeeded')::integer AS succeeded,
       count(*) FILTER (WHERE status IN ('failed', 'canceled', 'aborted'))::integer AS failed,
       coalesce(sum(jsonb_array_length(output_urls)) FILTER (WHERE status = 'succeeded'), 0)::integer
           AS outputs_expected,
       min(started_at) AS started_at,
       max(completed_at) AS completed_at,
       min(error) FILTER (WHERE status IN ('failed', 'canceled', 'aborted')) AS error
FROM predictions
WHERE job_id IS NOT NULL
GROUP BY job_id, coalesce(step, 1);

CREATE VIEW job_step_output_rollups AS
SELECT o.job_id,
       coalesce(p.step, 1) AS step,
       count(*) FILTER (WHERE o.status = 'processed')::integer AS processed,
       count(*) FILTER (WHERE o.status = 'failed')::integer AS failed,
       max(o.recorded_at) AS completed_at,
       coalesce(jsonb_agg(jsonb_build_object(
                    'prediction_id', o.prediction_id, 'index', o.index, 'step', coalesce(p.step, 1),
                    'source_url', o.source_url, 'url', o.url, 'width', o.width, 'height', o.height)
                ORDER BY o.prediction_id, o.index) FILTER (WHERE o.status = 'processed'),
                '[]'::jsonb) AS outputs,
       min(o.error) FILTER (WHERE o.status = 'failed') AS error
FROM outputs o
LEFT JOIN predictions p ON p.id = o.prediction_id
WHERE o.job_id IS NOT NULL
GROUP BY o.job_id, coalesce(p.step, 1);

-- Where one step of a job stands: waiting, running, post-processing, or settled with
-- some results (done) or none (failed). `expected` is how many predictions the step needs.
CREATE FUNCTION job_step_state(
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
CREATE FUNCTION job_status(canceled_at timestamptz, first_step text, has_next boolean,
                           next_step text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN canceled_at IS NOT NULL THEN 'canceled'
    WHEN first_step <> 'done' THEN CASE first_step WHEN 'failed' THEN 'failed' ELSE first_step END
    WHEN NOT has_next THEN 'completed'
    WHEN next_step = 'pending' THEN 'processing'  -- step 2 about to be submitted
    WHEN next_step = 'queued' THEN 'running'
    WHEN next_step = 'done' THEN 'completed'
    ELSE next_step END;

-- Every derived column of a job, computed from its predictions and outputs.
CREATE VIEW job_derived AS
SELECT j.id, st.status,
       coalesce(r1.submitted, 0) + coalesce(r2.submitted, 0) AS predictions_submitted,
       coalesce(r1.succeeded, 0) + coalesce(r2.succeeded, 0) AS predictions_succeeded,
       coalesce(r1.failed, 0) + coalesce(r2.failed, 0) AS predictions_failed,
       coalesce(r1.outputs_expected, 0) + coalesce(r2.outputs_expected, 0) AS outputs_expected,
       coalesce(o1.processed, 0) + coalesce(o2.processed, 0) AS outputs_processed,
       coalesce(o1.failed, 0) + coalesce(o2.failed, 0) AS outputs_failed,
       coalesce(o1.outputs, '[]'::jsonb) || coalesce(o2.outputs, '[]'::jsonb) AS outputs,
       CASE WHEN st.status = 'failed' THEN coalesce(r2.error, o2.error, r1.error, o1.error,
                                                    'no prediction succeeded') END AS error,
       r1.started_at,
       CASE st.status
           WHEN 'canceled' THEN j.canceled_at
           WHEN 'completed' THEN greatest(r1.completed_at, o1.completed_at, r2.completed_at, o2.completed_at)
           WHEN 'failed' THEN greatest(r1.completed_at, o1.completed_at, r2.completed_at, o2.completed_at)
       END AS completed_at
FROM jobs j
LEFT JOIN job_step_rollups r1 ON r1.job_id = j.id AND r1.step = 1
LEFT JOIN job_step_output_rollups o1 ON o1.job_id = j.id AND o1.step = 1
LEFT JOIN job_step_rollups r2 ON r2.job_id = j.id AND r2.step = 2
LEFT JOIN job_step_output_rollups o2 ON o2.job_id = j.id AND o2.step = 2
CROSS JOIN LATERAL (SELECT
    job_step_state(j.predictions_expected, coalesce(r1.submitted, 0), coalesce(r1.started, 0),
                   coalesce(r1.succeeded, 0), coalesce(r1.failed, 0), coalesce(r1.outputs_expected, 0),
                   coalesce(o1.processed, 0), coalesce(o1.failed, 0)) AS first_step,
    1 AS next_expected) s1
CROSS JOIN LATERAL (SELECT
    job_step_state(s1.next_expected, coalesce(r2.submitted, 0), coalesce(r2.started, 0),
                   coalesce(r2.succeeded, 0), coalesce(r2.failed, 0), coalesce(r2.outputs_expected, 0),
                   coalesce(o2.processed, 0), coalesce(o2.failed, 0)) AS next_step) s2
CROSS JOIN LATERAL (SELECT job_status(j.canceled_at, s1.first_step, j.next_step IS NOT NULL,
                                      s2.next_step) AS status) st;

-- Bring the derived columns of one job (or, with NULL, of every job) up to date.
-- Rows that would not change are not written, so a log line does not rewrite a job.
CREATE FUNCTION refresh_jobs(p_job uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- Static statements, not EXECUTE: PL/pgSQL keeps their plans for the session, and
    -- planning job_derived costs many times what running it for one job does. For one
    -- job, OFFSET 0 has the row computed once: flattened into this UPDATE, each use of a
    -- derived column (in SET and in the comparison) repeats its whole expression.
    IF p_job IS NOT NULL THEN
        UPDATE jobs j
        SET (status, predictions_submitted, predictions_succeeded, predictions_failed,
             outputs_expected, outputs_processed, outputs_failed, outputs, error,
             started_at, completed_at)
          = (d.status, d.predictions_submitted, d.predictions_succeeded, d.predictions_failed,
             d.outputs_expected, d.outputs_processed, d.outputs_failed, d.outputs, d.error,
             d.started_at, d.completed_at)
        FROM (SELECT * FROM job_derived WHERE id = p_job OFFSET 0) d
        WHERE d.id = j.id
          AND (j.status, j.predictions_submitted, j.predictions_succeeded, j.predictions_failed,
               j.outputs_expected, j.outputs_processed, j.outputs_failed, j.outputs, j.error,
               j.started_at, j.completed_at)
              IS DISTINCT FROM
              (d.status, d.predictions_submitted, d.predictions_succeeded, d.predictions_failed,
               d.outputs_expected, d.outputs_processed, d.outputs_failed, d.outputs, d.error,
               d.started_at, d.completed_at)
          AND j.id = p_job;
    ELSE
        UPDATE jobs j
        SET (status, predictions_submitted, predictions_succeeded, predictions_failed,
             outputs_expected, outputs_processed, outputs_failed, outputs, error,
             started_at, completed_at)
          = (d.status, d.predictions_submitted, d.predictions_succeeded, d.predictions_failed,
             d.outputs_expected, d.outputs_processed, d.outputs_failed, d.outputs, d.error,
             d.started_at, d.completed_at)
        FROM job_derived d
        WHERE d.id = j.id
          AND (j.status, j.predictions_submitted, j.predictions_succeeded, j.predictions_failed,
               j.outputs_expected, j.outputs_processed, j.outputs_failed, j.outputs, j.error,
               j.started_at, j.completed_at)
              IS DISTINCT FROM
              (d.status, d.predictions_submitted, d.predictions_succeeded, d.predictions_failed,
               d.outputs_expected, d.outputs_processed, d.outputs_failed, d.outputs, d.error,
               d.started_at, d.completed_at);
    END IF;
END $$;

-- Fold one prediction event into predictions: each field group keeps the value whose
-- fold key is greater (see the top of this file); counts add up.
CREATE FUNCTION apply_prediction_event(e events) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
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
        event_count   = p.event_count + 1;
END $$;

CREATE FUNCTION apply_output_event(e events) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO outputs AS o
    SELECT * FROM output_facts(e.stream, e.type, e.data, e.position, e.recorded_at)
    ON CONFLICT (prediction_id, index) DO UPDATE SET
        (job_id, status, source_url, url, original_url, width, height, bytes, error, detail,
         recorded_at, fold_key)
      = (excluded.job_id, excluded.status, excluded.source_url, excluded.url, excluded.original_url,
         excluded.width, excluded.height, excluded.bytes, excluded.error, excluded.detail,
         excluded.recorded_at, excluded.fold_key)
    WHERE excluded.fold_key > o.fold_key
$$;

-- What else must happen, in the same transaction, once an event has been folded live
-- (never during a rebuild): later migrations replace this, e.g. to enqueue the work an
-- event calls for.
CREATE FUNCTION on_event_applied(e events) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
END $$;

-- Fold one recorded event into every projection. Called by append_event in the
-- transaction that records the event.
CREATE FUNCTION apply_event(e events) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := stream_job_id(e.stream);
BEGIN
    IF e.type = 'job.created' THEN
        INSERT INTO jobs
        SELECT j.* FROM job_stream_stats s
        CROSS JOIN LATERAL job_facts(e.stream, e.data, e.recorded_at, s.event_count, s.last_position,
                                     s.updated_at, s.canceled_at, s.submit_failures) j
        WHERE s.stream = e.stream
        ON CONFLICT (id) DO NOTHING;
        PERFORM refresh_jobs(v_job);
        PERFORM on_event_applied(e);
        RETURN;
    ELSIF e.type IN ('prediction.submitted', 'replicate.webhook', 'replicate.polled',
                     'prediction.submit_failed') THEN
        PERFORM apply_prediction_event(e);
    ELSIF e.type IN ('output.processed', 'output.failed') THEN
        PERFORM apply_output_event(e);
    END IF;
    IF v_job IS NOT NULL THEN
        UPDATE jobs SET
            event_count     = event_count + 1,
            last_position   = greatest(last_position, e.position),
            updated_at      = greatest(updated_at, e.recorded_at),
            canceled_at     = CASE WHEN e.type = 'job.canceled'
                                   THEN least(canceled_at, e.recorded_at) ELSE canceled_at END,
            submit_failures = submit_failures + is_final_submit_failure(e.type, e.data)::integer
        WHERE id = v_job;
        PERFORM refresh_jobs(v_job);
    END IF;
    PERFORM on_event_applied(e);
END $$;

-- Record one event and fold it into the projections, in the caller's transaction.
-- Idempotent by event_key: a duplicate records nothing, changes nothing, and returns
-- the original event's position with duplicate = true. Appends to one stream are
-- serialised (advisory lock), so a job's derived counts never miss a concurrent event;
-- a full replay holds a SHARE lock on events, so appends wait for it to commit.
CREATE FUNCTION append_event(
    p_event_key text, p_stream text, p_type text, p_data jsonb, p_metadata jsonb DEFAULT '{}'
) RETURNS TABLE (event_position bigint, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    e events;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_stream, 0));
    INSERT INTO events (event_key, stream, type, data, metadata)
    VALUES (p_event_key, p_stream, p_type, p_data, coalesce(p_metadata, '{}'::jsonb))
    ON CONFLICT (event_key) DO NOTHING
    RETURNING * INTO e;
    IF e.position IS NULL THEN
        RETURN QUERY SELECT ev.position, true FROM events ev WHERE ev.event_key = p_event_key;
        RETURN;
    END IF;
    PERFORM apply_event(e);
    RETURN QUERY SELECT e.position, false;
END $$;

-- The rebuild: the same facts and fold keys, applied set-based. Each function works on
-- every stream (p_stream NULL) or on one, and expects the caller to have emptied that
-- part of the projections first (clear_projections) in the same transaction.

CREATE FUNCTION stream_filter(p_stream text, alias text) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN CASE WHEN p_stream IS NULL THEN 'true' ELSE alias || '.stream = $1' END;

CREATE FUNCTION clear_projections(p_stream text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_stream IS NULL THEN
        DELETE FROM outputs;
        DELETE FROM predictions;
        DELETE FROM jobs;
    ELSE
        DELETE FROM outputs WHERE job_id = stream_job_id(p_stream);
        DELETE FROM predictions WHERE job_id = stream_job_id(p_stream)
            OR (job_id IS NULL AND id = p_stream);
        DELETE FROM jobs WHERE id = stream_job_id(p_stream);
    END IF;
END $$;

CREATE FUNCTION rebuild_predictions(p_stream text) RETURNS bigint
LANGUAGE plpgsql
-- The aggregation keeps one group per prediction (about 1 kB each): in memory it reads
-- each event once; spilled to disk it would write and read them all again.
SET work_mem = '256MB'
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
    -- in a fenced subquery so the aggregation sees narrow rows). Kept in a table so that
    -- the planner knows how many there are when it joins them to their events.
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
    -- logs and output keys at once: it is read once (joined by hash, in one scan), and the
    -- logs' or output's own winner is looked up only when it is another event.
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
    FROM rebuild_prediction_groups g
    JOIN events se ON se.position = g.state_at
    CROSS JOIN LATERAL prediction_facts(se.stream, se.type, se.data, se.metadata,
                                        se.position, se.recorded_at) s
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

CREATE FUNCTION rebuild_outputs(p_stream text) RETURNS bigint
LANGUAGE plpgsql
SET work_mem = '256MB'  -- sort the outputs in memory, not in files
AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format($sql$
        INSERT INTO outputs
        SELECT DISTINCT ON (f.prediction_id, f.index) f.*
        FROM events e
        CROSS JOIN LATERAL output_facts(e.stream, e.type, e.data, e.position, e.recorded_at) f
        WHERE e.type IN ('output.processed', 'output.failed') AND %s
        ORDER BY f.prediction_id, f.index, f.fold_key DESC
    $sql$, stream_filter(p_stream, 'e')) USING p_stream;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

CREATE FUNCTION rebuild_jobs(p_stream text) RETURNS bigint
LANGUAGE plpgsql
-- Group the events by stream and join the rollups in memory (hash tables), rather than
-- reading events in stream order through the index and sorting rollups in files.
SET work_mem = '256MB'
AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format($sql$
        INSERT INTO jobs
        SELECT j.*
        -- OFFSET 0: ask which streams are jobs once per stream, not once per event
        FROM (SELECT * FROM job_stream_stats s WHERE %s OFFSET 0) s
        JOIN events c ON c.stream = s.stream AND c.type = 'job.created'
        CROSS JOIN LATERAL job_facts(c.stream, c.data, c.recorded_at, s.event_count,
                                     s.last_position, s.updated_at, s.canceled_at,
                                     s.submit_failures) j
        WHERE stream_job_id(s.stream) IS NOT NULL
    $sql$, stream_filter(p_stream, 's')) USING p_stream;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF p_stream IS NULL OR stream_job_id(p_stream) IS NOT NULL THEN
        PERFORM refresh_jobs(stream_job_id(p_stream));
    END IF;
    RETURN n;
END $$;
