-- History views: the questions a person asks after the fact ("what happened to job X",
-- "how fast was this model yesterday", "which webhooks came twice"), answerable with
-- psql alone. docs/sql.md explains every column and has example queries.
--
--   job_history          one row per job: what it ran, how it ended, how long each phase took
--   job_timeline         every event of a stream (a job, or an orphan prediction), in order,
--                        with a one-line summary and a flag for repeated bodies
--   model_daily_summary  per UTC day of creation and model: counts, success rate, p50/p95
--   orphan_predictions   predictions no known job claims
--
-- The views only read: the projections (jobs, predictions, outputs, job_activity, kept
-- by sql/fold.sql) and events. They are security_invoker, so a role sees through them
-- exactly what it may read in the tables underneath (Supabase exposes views over its
-- API; a default, definer-rights view would bypass the tables' privileges and policies).
--
-- Two clocks. A job's created_at (and canceled_at, and an output's recorded_at) are this
-- database's clock; a prediction's started_at and completed_at are Replicate's, copied
-- from its bodies. A duration across them can come out slightly negative when the clocks
-- disagree, and Replicate has sent impossible timestamps (started after completed, with a
-- negative predict_time to match). A negative duration or predict_time is therefore
-- treated as unknown (NULL): it is left out of sums and percentiles rather than letting
-- one bad body pull a model's numbers below zero. job_history.predict_time_anomalies
-- counts the predictions whose predict_time was dropped this way.
--
-- Re-applied as a whole by `flask --app service migrate` whenever this file changes (see
-- docs/sql.md): every statement here must be safe to run again.

-- How long from start to finish; NULL when either is unknown or the result is negative.
CREATE OR REPLACE FUNCTION history_duration(start timestamptz, finish timestamptz) RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN finish >= start THEN finish - start END;

-- An interval in seconds (numeric, so sums and averages stay exact).
CREATE OR REPLACE FUNCTION history_seconds(duration interval) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN extract(epoch FROM duration);

-- metrics.predict_time in seconds, or NULL when it is missing, not a number, or negative.
-- (Nested CASE, not AND: SQL does not promise to test the type before the cast.)
CREATE OR REPLACE FUNCTION history_predict_seconds(metrics jsonb) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN jsonb_typeof(metrics -> 'predict_time') = 'number' THEN
    CASE WHEN (metrics -> 'predict_time')::numeric >= 0 THEN (metrics -> 'predict_time')::numeric END
END;

-- A byte count for people: 512 B, 1.2 KB, 3.4 MB (1 KB = 1024 B).
CREATE OR REPLACE FUNCTION history_bytes(n bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN n < 1024 THEN n::text || ' B'
    WHEN n < 1024 * 1024 THEN round(n / 1024.0, 1)::text || ' KB'
    ELSE round(n / (1024.0 * 1024), 1)::text || ' MB' END;

-- "1 output", "4 outputs": a count with its noun.
CREATE OR REPLACE FUNCTION history_count(n bigint, noun text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN n::text || ' ' || noun || CASE WHEN n = 1 THEN '' ELSE 's' END;

-- What a prediction body says, in a few words: status (error), outputs, logs.
-- (Stable, not immutable, only because concat_ws is; see text_timestamptz in sql/fold.sql.)
CREATE OR REPLACE FUNCTION history_prediction_summary(body jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN concat_ws(', ',
    coalesce(body ->> 'status', 'no status')
        || coalesce(' (' || left(body ->> 'error', 120) || ')', ''),
    CASE WHEN jsonb_array_length(output_urls(body -> 'output')) > 0
         THEN history_count(jsonb_array_length(output_urls(body -> 'output')), 'output')
         WHEN nullif(body -> 'output', 'null'::jsonb) IS NOT NULL THEN 'output without files' END,
    CASE WHEN octet_length(body ->> 'logs') > 0
         THEN history_bytes(octet_length(body ->> 'logs')) || ' of logs' END);

-- One line saying what an event is about, for job_timeline.
CREATE OR REPLACE FUNCTION history_event_summary(type text, data jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE type
    WHEN 'job.created' THEN 'created: ' || concat_ws(', ',
        coalesce(data ->> 'model', data ->> 'deployment', data ->> 'version', 'no model'),
        history_count(coalesce(small_int(data ->> 'count'), 1), 'prediction'),
        coalesce(data ->> 'aspect_ratio', '1:1'),
        'then ' || coalesce(data -> 'then' ->> 'model', data -> 'then' ->> 'deployment',
                            data -> 'then' ->> 'version'))
    WHEN 'job.canceled' THEN 'canceled' || coalesce(': ' || left(data ->> 'reason', 120), '')
    WHEN 'job.retried' THEN 'retry ' || coalesce(data ->> 'retry', '?') || ': '
        || history_count(CASE WHEN jsonb_typeof(data -> 'predictions') = 'array'
                              THEN jsonb_array_length(data -> 'predictions') ELSE 0 END, 'prediction')
        || ' submitted again'
    WHEN 'prediction.submitted' THEN 'submitted step ' || coalesce(data ->> 'step', '?') || ': '
        || coalesce(data -> 'prediction' ->> 'id', 'no prediction id')
        || coalesce(' (' || (data -> 'prediction' ->> 'status') || ')', '')
        || coalesce(', retry ' || (data ->> 'retry'), '')
    WHEN 'prediction.submit_failed' THEN 'submit failed'
        || coalesce(' at step ' || (data ->> 'step'), '')
        || coalesce(': ' || left(data ->> 'error', 120), '')
    WHEN 'replicate.webhook' THEN 'webhook: ' || history_prediction_summary(data)
    WHEN 'replicate.polled' THEN 'polled: ' || history_prediction_summary(data)
    WHEN 'output.processed' THEN concat_ws(' ',
        'output', coalesce(data ->> 'index', '?'), 'processed',
        (data ->> 'width') || 'x' || (data ->> 'height'))
        || coalesce(', ' || history_bytes(CASE WHEN data ->> 'bytes' ~ '^[0-9]{1,15}$'
                                               THEN (data ->> 'bytes')::bigint END), '')
    WHEN 'output.failed' THEN 'output ' || coalesce(data ->> 'index', '?') || ' failed'
        || coalesce(': ' || left(data ->> 'error', 120), '')
    ELSE type END;


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
       a.event_count,
       j.deadline,
       (SELECT count(*) FROM events e WHERE e.stream = j.id::text AND e.type = 'job.retried')::integer
           AS retries,
       j.owner_id
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

COMMENT ON VIEW job_history IS
    'One row per job: model (or deployment, or version), status, timestamps; queued (created to '
    'started), run (started to completed) and total (created to completed) as interval and '
    'seconds; predict_time summed over its predictions, negative values ignored and counted in '
    'predict_time_anomalies; prediction and output counts; error. A negative duration is NULL.';
COMMENT ON COLUMN job_history.model IS 'jobs.model, else the deployment, else the version';
COMMENT ON COLUMN job_history.started_at IS 'earliest started_at of its predictions (Replicate''s clock)';
COMMENT ON COLUMN job_history.completed_at IS
    'completed/failed: last prediction or output to finish; canceled: when job.canceled was recorded';
COMMENT ON COLUMN job_history.queued_duration IS 'created_at to started_at; NULL if unknown or negative';
COMMENT ON COLUMN job_history.run_duration IS 'started_at to completed_at; NULL if unknown or negative';
COMMENT ON COLUMN job_history.total_duration IS 'created_at to completed_at; NULL if unknown or negative';
COMMENT ON COLUMN job_history.predict_time_seconds IS
    'sum of metrics.predict_time over the job''s predictions (GPU seconds Replicate bills), '
    'negative values left out; NULL when no prediction reported one';
COMMENT ON COLUMN job_history.deadline IS
    'when the job''s cancel_after ran out (NULL: no deadline); a failed job it stopped has error ''deadline exceeded''';
COMMENT ON COLUMN job_history.retries IS
    'retry rounds (job.retried events); retried predictions still count in predict_time';
COMMENT ON COLUMN job_history.owner_id IS 'the user the job belongs to; NULL for a job with no owner';
COMMENT ON COLUMN job_history.predict_time_anomalies IS
    'predictions whose predict_time was negative and so left out of predict_time';
COMMENT ON COLUMN job_history.predictions_failed IS 'predictions that failed, were canceled or aborted';
COMMENT ON COLUMN job_history.outputs IS 'outputs processed (downloaded, resized, stored)';
COMMENT ON COLUMN job_history.last_event_at IS 'when the job''s latest event was recorded';


CREATE OR REPLACE VIEW job_timeline WITH (security_invoker = true) AS
SELECT w.stream,
       stream_job_id(w.stream) AS job_id,
       w.seq,
       w.position,
       w.recorded_at,
       w.recorded_at - w.first_recorded_at AS elapsed,
       w.type,
       w.event_key,
       coalesce(prediction_body(w.type, w.data) ->> 'id',
                CASE WHEN w.type IN ('output.processed', 'output.failed')
                     THEN w.data ->> 'prediction_id' END) AS prediction_id,
       prediction_body(w.type, w.data) ->> 'status' AS prediction_status,
       history_event_summary(w.type, w.data) AS summary,
       w.repeat_of <> w.position AS is_repeat,
       nullif(w.repeat_of, w.position) AS repeat_of,
       w.data,
       w.metadata
FROM (
    -- Windows partitioned by stream only, so a filter on stream (or job_id) reaches the
    -- events index instead of numbering the whole log.
    SELECT e.*,
           row_number() OVER (PARTITION BY e.stream ORDER BY e.position) AS seq,
           min(e.recorded_at) OVER (PARTITION BY e.stream) AS first_recorded_at,
           min(e.position) OVER (
               PARTITION BY e.stream, e.type, coalesce(prediction_body(e.type, e.data), e.data)
           ) AS repeat_of
    FROM events e
) w
ORDER BY w.stream, w.position;

COMMENT ON VIEW job_timeline IS
    'Every event of every stream in order: stream is the job id (job_id) or, for an orphan, the '
    'prediction id; seq counts from 1 within the stream; elapsed is time since its first event; '
    'summary says what happened in one line; is_repeat marks a body identical to an earlier '
    'event of the same stream and type (repeat_of); data and metadata are the raw event. '
    'Filter on stream = ''<job id>'' to use the events index.';
COMMENT ON COLUMN job_timeline.stream IS 'the job id, or the prediction id of an orphan';
COMMENT ON COLUMN job_timeline.job_id IS 'the stream as a uuid; NULL for an orphan prediction';
COMMENT ON COLUMN job_timeline.seq IS '1, 2, 3 ... in position order within the stream';
COMMENT ON COLUMN job_timeline.elapsed IS 'recorded_at minus the stream''s first recorded_at';
COMMENT ON COLUMN job_timeline.prediction_id IS 'the prediction the event is about, if any';
COMMENT ON COLUMN job_timeline.prediction_status IS 'the status in the prediction body the event carries';
COMMENT ON COLUMN job_timeline.is_repeat IS
    'an earlier event of this stream and type carried an identical body (a retry under a new '
    'webhook-id, or a poll that learned nothing new); same-webhook-id retries are never recorded';
COMMENT ON COLUMN job_timeline.repeat_of IS 'position of the first event with the identical body';


CREATE OR REPLACE VIEW model_daily_summary WITH (security_invoker = true) AS
SELECT (h.created_at AT TIME ZONE 'UTC')::date AS day,
       h.model,
       count(*) AS jobs,
       count(*) FILTER (WHERE h.status = 'completed') AS completed,
       count(*) FILTER (WHERE h.status = 'failed') AS failed,
       count(*) FILTER (WHERE h.status = 'canceled') AS canceled,
       count(*) FILTER (WHERE h.status NOT IN ('completed', 'failed', 'canceled')) AS unfinished,
       round(count(*) FILTER (WHERE h.status = 'completed')::numeric
             / nullif(count(*) FILTER (WHERE h.status IN ('completed', 'failed', 'canceled')), 0),
             4) AS success_rate,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY h.total_seconds)
                 FILTER (WHERE h.status = 'completed')::numeric, 3) AS p50_total_seconds,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY h.total_seconds)
                 FILTER (WHERE h.status = 'completed')::numeric, 3) AS p95_total_seconds,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY h.predict_time_seconds)
                 FILTER (WHERE h.status = 'completed')::numeric, 3) AS p50_predict_seconds,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY h.predict_time_seconds)
                 FILTER (WHERE h.status = 'completed')::numeric, 3) AS p95_predict_seconds,
       sum(h.predict_time_seconds) AS predict_seconds_total,
       sum(h.outputs) AS outputs
FROM job_history h
GROUP BY 1, 2;

COMMENT ON VIEW model_daily_summary IS
    'Per UTC day of job creation and model: jobs, completed, failed, canceled, unfinished; '
    'success_rate = completed / (completed + failed + canceled), NULL when none finished; '
    'p50/p95 (percentile_cont) of total seconds and predict_time seconds over completed jobs; '
    'predict_time summed over all jobs (GPU seconds spent, failures included); outputs processed.';
COMMENT ON COLUMN model_daily_summary.day IS 'UTC date of the jobs'' created_at';
COMMENT ON COLUMN model_daily_summary.success_rate IS
    'completed / (completed + failed + canceled), 0..1; NULL when none has finished';
COMMENT ON COLUMN model_daily_summary.p95_total_seconds IS
    '95th percentile (percentile_cont) of created-to-completed seconds over completed jobs';


CREATE OR REPLACE VIEW orphan_predictions WITH (security_invoker = true) AS
SELECT p.id,
       p.job_id AS claimed_job_id,
       CASE WHEN p.job_id IS NULL THEN 'no job id' ELSE 'unknown job' END AS reason,
       p.status,
       p.model,
       p.version,
       p.error,
       p.first_seen_at,
       p.updated_at AS last_seen_at,
       p.event_count,
       p.created_at
FROM predictions p
WHERE p.job_id IS NULL
   OR NOT EXISTS (SELECT FROM jobs j WHERE j.id = p.job_id);

COMMENT ON VIEW orphan_predictions IS
    'Predictions no known job claims: reason ''no job id'' (the webhook URL named no job) or '
    '''unknown job'' (it named a job this database has no job.created for). first_seen_at and '
    'last_seen_at are when this database heard of it; created_at is Replicate''s.';
COMMENT ON COLUMN orphan_predictions.claimed_job_id IS 'the job the webhook URL named, if any';
COMMENT ON COLUMN orphan_predictions.reason IS '''no job id'' or ''unknown job''';


-- Compute per owner and per model: what the predictions ran, as Replicate bills it by
-- predict_time (GPU seconds). Retried predictions count: they ran. Bad predict_time values
-- are left out as in job_history. Dollars are not here: prices are the operator's
-- (REPLICATE_PRICES, service/costs.py), and Replicate publishes none through its API.
CREATE OR REPLACE VIEW owner_compute WITH (security_invoker = true) AS
SELECT j.owner_id,
       count(DISTINCT j.id) AS jobs,
       count(p.id) AS predictions,
       count(p.id) FILTER (WHERE p.status = 'succeeded') AS succeeded,
       sum(history_predict_seconds(p.metrics)) AS compute_seconds,
       count(p.id) FILTER (WHERE jsonb_typeof(p.metrics -> 'predict_time') = 'number'
                             AND history_predict_seconds(p.metrics) IS NULL) AS predict_time_anomalies
FROM jobs j
LEFT JOIN predictions p ON p.job_id = j.id
GROUP BY j.owner_id;

COMMENT ON VIEW owner_compute IS
    'Per job owner (NULL: jobs with no owner): jobs, predictions (retried ones too), succeeded, '
    'compute_seconds = sum of metrics.predict_time, negative values left out and counted in '
    'predict_time_anomalies.';

CREATE OR REPLACE VIEW model_compute WITH (security_invoker = true) AS
SELECT p.model,
       p.version,
       count(*) AS predictions,
       count(*) FILTER (WHERE p.status = 'succeeded') AS succeeded,
       sum(history_predict_seconds(p.metrics)) AS compute_seconds,
       count(*) FILTER (WHERE jsonb_typeof(p.metrics -> 'predict_time') = 'number'
                          AND history_predict_seconds(p.metrics) IS NULL) AS predict_time_anomalies
FROM predictions p
WHERE p.job_id IS NOT NULL
GROUP BY p.model, p.version;

COMMENT ON VIEW model_compute IS
    'Per model and version as Replicate reported them (the keys REPLICATE_PRICES prices): '
    'predictions of jobs (retried ones too), succeeded, compute_seconds = sum of '
    'metrics.predict_time, negative values left out and counted in predict_time_anomalies.';
