-- Named queries, looked up by name from Python (service/db.py: queries["name"]).
-- A `-- name --` line starts each block; the line after it says what the block does.

-- append_event --
-- Record one event and fold it into the projections; a duplicate key changes nothing.
SELECT event_position AS position, duplicate
FROM append_event(%(event_key)s, %(stream)s, %(type)s, %(data)s, %(metadata)s);

-- replay_space --
-- What a full replay's scratch copy of the projections is weighed against: about how many
-- events it reads (from the positions, without counting them), the live projections' size
-- on disk (tables, TOAST, indexes), and the server's data directory where this role may
-- see it (superuser or pg_read_all_settings; NULL otherwise).
SELECT coalesce((SELECT max(position) - min(position) + 1 FROM events), 0) AS events,
       (pg_total_relation_size('jobs') + pg_total_relation_size('predictions')
        + pg_total_relation_size('outputs') + pg_total_relation_size('job_activity'))::bigint
           AS projections_bytes,
       (SELECT setting FROM pg_settings WHERE name = 'data_directory') AS data_directory;

-- replay_event_count --
-- How many events of some streams (NULL: all) lie in (after, upto], the positions a replay reads.
SELECT count(*) AS n FROM events
WHERE position > %(after)s AND position <= %(upto)s
  AND (%(streams)s::text[] IS NULL OR stream = ANY (%(streams)s::text[]));

-- replay_changed_streams --
-- The streams (of some, NULL: all) with events in (after, upto], and how many events: what a
-- replay catches up.
SELECT array_agg(DISTINCT stream) AS streams, count(*) AS n FROM events
WHERE position > %(after)s AND position <= %(upto)s
  AND (%(streams)s::text[] IS NULL OR stream = ANY (%(streams)s::text[]));

-- lock_events_for_replay --
-- Wait until no append is in flight, and keep new ones waiting until this transaction ends
-- (appends take ROW EXCLUSIVE): how a replay takes a quiet snapshot and its cut-over.
LOCK TABLE events IN SHARE MODE;

-- lock_streams --
-- The lock append_event takes for each of these streams, in stream order as a group of
-- appends takes them (sql/store.sql), so the two cannot deadlock: a one-job replay's quiet
-- snapshot and cut-over, and each batch of a replay in batches.
SELECT pg_advisory_xact_lock(hashtextextended(s, 0))
FROM (SELECT s FROM unnest(%(streams)s::text[]) s ORDER BY s) o;

-- job_positions --
-- The bounds of one job's events' positions: its job.created's and its last event's, both
-- kept in its job_activity row (migration 024; 0 and the greatest bigint, no bound, for a
-- stream with no row or a job without its job.created yet). The reads of one job's events
-- below take them as values (lo, hi; service/events.py: job_stream), read first: the
-- planner then plans only the partitions that hold the job's events, so such a read costs
-- the same at any size of the store. With the bounds as functions in the read itself, the
-- partitions were left out only when it ran, after the planner had planned every one of
-- them, at each read (the service prepares no statements): at 20M events (24 partitions)
-- 2.5 ms a read, not 0.6. One row of job_activity (a row per job), not a key of
-- event_keys (a key per event, a deeper index) as well: fewer blocks a cold read.
SELECT coalesce(a.first_position, 0) AS lo, coalesce(a.last_position, 9223372036854775807) AS hi
FROM (SELECT stream_job_id(%(stream)s) AS job_id) j
LEFT JOIN job_activity a ON a.job_id = j.job_id;

-- job_events --
-- A job's events in recording order, within its positions (job_positions).
SELECT position, type, event_key, recorded_at, data, metadata
FROM events
WHERE stream = %(stream)s
  AND position BETWEEN %(lo)s::bigint AND %(hi)s::bigint
ORDER BY position;

-- database_ok --
-- Health check: the database answers and the schema is there.
SELECT (SELECT count(*) FROM schema_migrations) AS migrations;

-- status_counts --
-- How many jobs are in each status, and how many webhooks are orphans.
SELECT status, count(*) AS n FROM jobs GROUP BY status
UNION ALL
SELECT 'orphan predictions', count(*) FROM predictions WHERE job_id IS NULL;

-- enqueue_task --
-- Add a task once per task_key, in the caller's transaction.
SELECT enqueue_task(%(kind)s, %(key)s, %(job_id)s::uuid, %(payload)s,
                    coalesce(%(run_after)s::timestamptz, now()), %(max_attempts)s) AS id;

-- claim_task --
-- Lease the next runnable task of these kinds to this worker, owners in turn, holding back
-- the submissions of owners at their limits (NULL: no limit).
SELECT * FROM claim_task(%(worker)s, %(lease)s, %(kinds)s::text[], %(max_running)s, %(per_minute)s);

-- finish_task --
-- Mark a claimed task done, failed, or queued again after a delay; false if the lease was lost.
SELECT coalesce(finish_task(%(id)s, %(worker)s, %(status)s, %(error)s, %(delay)s), false) AS ok;

-- release_task --
-- Give a claimed task back without counting the attempt (worker shutting down).
SELECT coalesce(release_task(%(id)s, %(worker)s), false) AS ok;

-- extend_lease --
-- Keep a long task's lease alive.
SELECT coalesce(extend_lease(%(id)s, %(worker)s, %(lease)s), false) AS ok;

-- job_for_update --
-- One job, locked for the rest of the transaction (cancel checks then records).
SELECT * FROM jobs WHERE id = %(id)s::uuid FOR UPDATE;

-- unfinished_predictions --
-- A job's predictions that Replicate may still be running.
SELECT id, step FROM predictions
WHERE job_id = %(job_id)s::uuid AND status IN ('starting', 'processing')
ORDER BY step, id;

-- append_webhooks --
-- Record a group of verified Replicate webhooks (a JSON array of {webhook_id, job, body,
-- metadata}), each under its webhook-id in its job's stream, in one transaction.
SELECT n, event_position AS position, duplicate, stream FROM append_webhooks(%(group)s);

-- job_by_id --
-- One job from the projection, and the seconds left before its deadline (NULL: none).
SELECT *, extract(epoch FROM deadline - clock_timestamp())::float8 AS seconds_left
FROM jobs WHERE id = %(id)s::uuid;

-- quiet_predictions --
-- Unfinished predictions of unfinished jobs that have had no event for a while.
SELECT p.id, p.job_id::text AS job_id, p.step
FROM jobs j
JOIN job_activity a ON a.job_id = j.id
JOIN predictions p ON p.job_id = j.id
WHERE j.status IN ('queued', 'running', 'processing')
  AND a.updated_at < now() - make_interval(secs => %(quiet_seconds)s)
  AND p.status IN ('starting', 'processing')
ORDER BY a.updated_at
LIMIT %(limit)s;

-- failed_submissions --
-- Submissions that gave up on transient errors, whose job still waits for them: a job
-- waits in 'processing' for its second step. A refusal for good (its slot holds the failed
-- prediction unsubmitted-<job>-<step>-<index>, sql/fold.sql) is not tried again. A retry
-- round's submission (payload.retry = n) has :retry<n> in its task keys and -retry<n> in
-- its stand-in's id (service/submissions.py, slot); format() drops a NULL, as the first
-- round has none.
SELECT t.job_id::text AS job_id, t.payload
FROM tasks t JOIN jobs j ON j.id = t.job_id
WHERE t.kind = 'submit_prediction' AND t.status = 'failed'
  AND j.status IN ('pending', 'queued', 'running', 'processing')
  AND coalesce((t.payload ->> 'round')::int, 0) + 1 < %(rounds)s
  AND t.updated_at < now() - make_interval(secs => %(quiet_seconds)s)
  AND NOT EXISTS (
      SELECT 1 FROM tasks r
      WHERE r.task_key = format('submit:%%s:%%s:%%s%%s:r%%s', t.job_id, t.payload ->> 'step',
                                t.payload ->> 'index', ':retry' || (t.payload ->> 'retry'),
                                coalesce((t.payload ->> 'round')::int, 0) + 1))
  AND NOT EXISTS (
      SELECT 1 FROM predictions p
      WHERE p.id = format('unsubmitted-%%s-%%s-%%s%%s', t.job_id, t.payload ->> 'step', t.payload ->> 'index',
                          '-retry' || (t.payload ->> 'retry')))
LIMIT %(limit)s;

-- stalled_jobs --
-- Unfinished jobs with nothing under way: quiet, no prediction unfinished, no task queued
-- or running, no failed submission still to be tried again (failed_submissions' rule).
-- The fold cannot leave a job so (every slot and output ends, by a result or a failure);
-- a job found so lost a task, or met a bug, and the reconciler settles what it lacks.
SELECT j.id::text AS job_id, j.status, j.predictions_expected, j.next_step IS NOT NULL AS has_next
FROM jobs j
JOIN job_activity a ON a.job_id = j.id
WHERE j.status IN ('pending', 'queued', 'running', 'processing')
  AND a.updated_at < now() - make_interval(secs => %(quiet_seconds)s)
  AND NOT EXISTS (
      SELECT 1 FROM predictions p
      WHERE p.job_id = j.id AND p.status NOT IN ('succeeded', 'failed', 'canceled', 'aborted'))
  AND NOT EXISTS (
      SELECT 1 FROM tasks t
      WHERE t.job_id = j.id
        AND (t.status IN ('queued', 'running')
             OR (t.kind = 'submit_prediction' AND t.status = 'failed'
                 AND coalesce((t.payload ->> 'round')::int, 0) + 1 < %(rounds)s
                 AND NOT EXISTS (
                     SELECT 1 FROM predictions p
                     WHERE p.id = format('unsubmitted-%%s-%%s-%%s%%s', t.job_id, t.payload ->> 'step',
                                         t.payload ->> 'index', '-retry' || (t.payload ->> 'retry'))))))
ORDER BY a.updated_at
LIMIT %(limit)s;

-- unprocessed_outputs --
-- A job's outputs that no output event settled: each URL of a succeeded prediction with no
-- outputs row.
SELECT p.id AS prediction_id, u.ordinality - 1 AS index, u.url AS source_url
FROM predictions p
CROSS JOIN LATERAL jsonb_array_elements_text(p.output_urls) WITH ORDINALITY AS u(url, ordinality)
WHERE p.job_id = %(job_id)s::uuid AND p.status = 'succeeded'
  AND NOT EXISTS (SELECT 1 FROM outputs o WHERE o.prediction_id = p.id AND o.index = u.ordinality - 1)
ORDER BY p.id, u.ordinality;

-- submission_slots --
-- What a job's stream says of each slot (step, index) it submitted or tried to, in each
-- retry round (0: the first): submitted, or refused (with the error, and whether for good),
-- in order.
SELECT type, data ->> 'step' AS step, data ->> 'index' AS index, data ->> 'error' AS error,
       coalesce(data -> 'final' = 'true'::jsonb, false) AS final,
       coalesce(data ->> 'retry', '0') AS retry
FROM events
WHERE stream = %(stream)s
  AND position BETWEEN %(lo)s::bigint AND %(hi)s::bigint
  AND type IN ('prediction.submitted', 'prediction.submit_failed')
ORDER BY position;

-- job_predictions_by_step --
-- A job's predictions that count, each with the step it counts in (job_step_rollups'
-- coalesce): those a retry superseded count no more.
SELECT id, coalesce(step, 1) AS step FROM predictions WHERE job_id = %(job_id)s::uuid AND NOT superseded;

-- job_view --
-- One job as the jobs API shows it, from the projection (and its count of retries, from its
-- events within its positions: job_positions); with an owner, only theirs.
SELECT id, status, model, version, deployment, aspect_ratio, postprocess, metadata, next_step,
       predictions_expected, predictions_succeeded, predictions_failed, outputs_processed,
       outputs, error, created_at, started_at, completed_at, deadline,
       (SELECT a.updated_at FROM job_activity a WHERE a.job_id = jobs.id) AS updated_at,
       owner_id,
       (SELECT count(*) FROM events e WHERE e.stream = jobs.id::text AND e.type = 'job.retried'
            AND e.position BETWEEN %(lo)s::bigint AND %(hi)s::bigint)::integer AS retries
FROM jobs WHERE id = %(id)s::uuid
  AND (%(owner)s::uuid IS NULL OR owner_id = %(owner)s::uuid);

-- job_visible --
-- Whether a job exists and, with an owner, is theirs (a user's request sees only their jobs).
SELECT 1 AS visible FROM jobs WHERE id = %(id)s::uuid
  AND (%(owner)s::uuid IS NULL OR owner_id = %(owner)s::uuid);

-- job_predictions_view --
-- A job's predictions as the jobs API shows them, by step then creation.
SELECT id, step, status, error, metrics, created_at, started_at, completed_at, superseded
FROM predictions WHERE job_id = %(job_id)s::uuid
ORDER BY step NULLS LAST, created_at NULLS LAST, id;

-- list_jobs --
-- A page of jobs newest first (created_at, id descending), by status and model when given,
-- after the keyset cursor when given, and only the owner's when given (a user's request).
-- The plain created_at bound lets the status, model and owner indexes (x, created_at DESC)
-- range-scan; the row comparison breaks ties on id.
SELECT id, status, model, version, deployment, aspect_ratio, postprocess, metadata,
       predictions_expected, predictions_succeeded, predictions_failed, outputs_processed,
       outputs, error, created_at, started_at, completed_at, deadline,
       (SELECT a.updated_at FROM job_activity a WHERE a.job_id = jobs.id) AS updated_at,
       (SELECT count(*) FROM events e WHERE e.stream = jobs.id::text AND e.type = 'job.retried'
            AND e.position BETWEEN job_first_position(jobs.id::text)
                               AND job_last_position(jobs.id::text))::integer
           AS retries
FROM jobs
WHERE (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(model)s::text IS NULL OR model = %(model)s::text)
  AND (%(owner)s::uuid IS NULL OR owner_id = %(owner)s::uuid)
  AND (%(after_created_at)s::timestamptz IS NULL
       OR (created_at <= %(after_created_at)s::timestamptz
           AND (created_at, id) < (%(after_created_at)s::timestamptz, %(after_id)s::uuid)))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- job_created_data --
-- What a job's job.created event recorded: tells a repeated create from a reused Idempotency-Key.
SELECT data FROM events
WHERE stream = %(stream)s
  AND position BETWEEN %(lo)s::bigint AND %(hi)s::bigint
  AND type = 'job.created'
ORDER BY position LIMIT 1;

-- prediction_for_slot --
-- The first webhook Replicate sent for a job's step and index in a retry round (all from
-- the webhook URL; no retry in it: the first round, 0).
SELECT data FROM events
WHERE stream = %(stream)s
  AND position BETWEEN %(lo)s::bigint AND %(hi)s::bigint
  AND type = 'replicate.webhook'
  AND metadata -> 'query' ->> 'step' = %(step)s AND metadata -> 'query' ->> 'index' = %(index)s
  AND coalesce(metadata -> 'query' ->> 'retry', '0') = %(retry)s
ORDER BY position LIMIT 1;

-- record_unrecorded_webhook --
-- Count one webhook delivery answered without an event: refused (401/400/413) or a duplicate.
INSERT INTO unrecorded_webhooks (outcome, http_status, webhook_id, remote_addr, detail)
VALUES (%(outcome)s, %(http_status)s, %(webhook_id)s, %(remote_addr)s, %(detail)s);

-- dashboard_webhook_health --
-- Webhooks in the last %(minutes)s minutes: how many were recorded, the acknowledgement time
-- proxy recorded_at − metadata.received_at (ms, p50 and p95), and deliveries not recorded by outcome.
WITH recorded AS (
    SELECT CASE WHEN e.metadata ->> 'received_at' ~ '^\d{4}-\d\d-\d\dT'
                THEN greatest(0, 1000 * extract(epoch FROM
                         e.recorded_at - (e.metadata ->> 'received_at')::timestamptz)) END AS ack_ms
    FROM events e
    WHERE e.type = 'replicate.webhook'
      AND e.recorded_at >= now() - make_interval(mins => %(minutes)s)
), unrecorded AS (
    SELECT outcome, count(*) AS n FROM unrecorded_webhooks
    WHERE received_at >= now() - make_interval(mins => %(minutes)s)
    GROUP BY outcome
)
SELECT (SELECT count(*) FROM recorded) AS recorded,
       (SELECT count(ack_ms) FROM recorded) AS ack_samples,
       (SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ack_ms)::numeric, 1) FROM recorded)
           AS ack_ms_p50,
       (SELECT round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ack_ms)::numeric, 1) FROM recorded)
           AS ack_ms_p95,
       (SELECT coalesce(jsonb_object_agg(outcome, n), '{}'::jsonb) FROM unrecorded) AS unrecorded,
       now() AS at;

-- dashboard_webhook_series --
-- Webhooks recorded and deliveries not recorded per bucket of %(bucket_seconds)s seconds, the
-- last %(buckets)s buckets up to now, oldest first (empty buckets included).
WITH bins AS (
    SELECT date_bin(make_interval(secs => %(bucket_seconds)s), now(), timestamptz '2000-01-01')
               - make_interval(secs => %(bucket_seconds)s * (%(buckets)s - 1)) AS first,
           make_interval(secs => %(bucket_seconds)s) AS width
), recorded AS (
    SELECT date_bin(make_interval(secs => %(bucket_seconds)s), recorded_at, timestamptz '2000-01-01') AS start,
           count(*) AS n
    FROM events
    WHERE type = 'replicate.webhook'
      AND recorded_at >= date_bin(make_interval(secs => %(bucket_seconds)s), now(), timestamptz '2000-01-01')
                         - make_interval(secs => %(bucket_seconds)s * (%(buckets)s - 1))
    GROUP BY 1
), unrecorded AS (
    SELECT date_bin(make_interval(secs => %(bucket_seconds)s), received_at, timestamptz '2000-01-01') AS start,
           count(*) AS n
    FROM unrecorded_webhooks, bins
    WHERE received_at >= bins.first
    GROUP BY 1
)
SELECT s.start, coalesce(r.n, 0) AS recorded, coalesce(u.n, 0) AS unrecorded
FROM bins, generate_series(bins.first, bins.first + bins.width * (%(buckets)s - 1), bins.width) AS s(start)
LEFT JOIN recorded r ON r.start = s.start
LEFT JOIN unrecorded u ON u.start = s.start
ORDER BY s.start;

-- dashboard_stuck_jobs --
-- Unfinished jobs with no event for longer than the reconciler waits, quietest first, and how many.
SELECT j.id, j.status, j.model, a.updated_at, count(*) OVER () AS total
FROM jobs j JOIN job_activity a ON a.job_id = j.id
WHERE j.status IN ('pending', 'queued', 'running', 'processing')
  AND a.updated_at < now() - make_interval(secs => %(stuck_after)s)
ORDER BY a.updated_at
LIMIT %(limit)s;

-- dashboard_models --
-- The distinct models of all jobs (up to 200), read from the model index one value at a time.
WITH RECURSIVE m AS (
    (SELECT model, 1 AS n FROM jobs WHERE model IS NOT NULL ORDER BY model LIMIT 1)
    UNION ALL
    SELECT (SELECT j.model FROM jobs j WHERE j.model > m.model ORDER BY j.model LIMIT 1), m.n + 1
    FROM m WHERE m.model IS NOT NULL AND m.n < 200
)
SELECT model FROM m WHERE model IS NOT NULL;

-- dashboard_search_jobs --
-- Jobs whose id starts with a hex prefix: ids between the prefix padded with 0s and with fs.
SELECT id, status, model, version, deployment, created_at
FROM jobs WHERE id BETWEEN %(low)s::uuid AND %(high)s::uuid
ORDER BY id LIMIT %(limit)s;

-- dashboard_search_job_tails --
-- Jobs whose id ends with these hex digits (the dashboard shows a job's last 8; a job id's
-- first characters are its creation time, UUIDv7), newest first. No index serves a suffix:
-- the ids are read from jobs_created_at (created_at, id) alone, newest first, stopping at
-- the limit, so a recent job is found at once and a miss reads the whole index (at 3.9M
-- jobs, warm: 2.6 s compared as text, 0.6-1.1 s as the uuid's last bytes first: `even` is
-- the tail's last 2 * `bytes` digits, and only an id whose bytes match has its text compared).
SELECT j.id, j.status, j.model, j.version, j.deployment, j.created_at
FROM jobs j
WHERE j.id IN (SELECT t.id FROM jobs t
               WHERE substr(uuid_send(t.id), 17 - %(bytes)s) = decode(%(even)s, 'hex')
                 AND right(t.id::text, length(%(tail)s)) = %(tail)s
               ORDER BY t.created_at DESC, t.id DESC LIMIT %(limit)s)
ORDER BY j.created_at DESC, j.id DESC;

-- dashboard_search_predictions --
-- A prediction by its exact id, with the job it belongs to (none for an orphan).
SELECT id, job_id, step, status, model, version, first_seen_at
FROM predictions WHERE id = %(id)s;

-- dashboard_timeline --
-- A job's events in order as job_timeline tells them (without their bodies), and how many
-- times each recorded webhook was delivered again under its webhook-id (answered, not stored).
SELECT t.seq, t.position, t.recorded_at, round(extract(epoch FROM t.elapsed)::numeric, 3) AS elapsed_seconds,
       t.type, t.event_key, t.prediction_id, t.prediction_status, t.summary, t.is_repeat, t.repeat_of,
       t.metadata ->> 'source' AS source, t.metadata ->> 'received_at' AS received_at,
       CASE WHEN t.type = 'replicate.webhook'
            THEN (SELECT count(*) FROM unrecorded_webhooks u
                  WHERE u.outcome = 'duplicate' AND u.webhook_id = t.event_key)
            ELSE 0 END AS redeliveries,
       count(*) OVER () AS total
FROM job_timeline t
WHERE t.stream = %(stream)s
ORDER BY t.position
LIMIT %(limit)s;

-- dashboard_outputs --
-- A job's outputs, processed and failed, with the stored original and the processing plan.
SELECT o.prediction_id, o.index, coalesce(p.step, 1) AS step, o.status, o.source_url, o.url,
       o.original_url, o.width, o.height, o.bytes, o.error, o.detail ->> 'format' AS format,
       o.detail -> 'plan' AS plan, o.recorded_at,
       CASE WHEN o.detail ->> 'original_bytes' ~ '^[0-9]{1,15}$'
            THEN (o.detail ->> 'original_bytes')::bigint END AS original_bytes
FROM outputs o
LEFT JOIN predictions p ON p.id = o.prediction_id
WHERE o.job_id = %(job_id)s::uuid
ORDER BY coalesce(p.step, 1), o.prediction_id, o.index;

-- dashboard_event --
-- One event, whole: the raw JSON behind a timeline entry; for a webhook, also the delivery as
-- received (whole body, headers) while the delivery log keeps it, else delivery is null.
SELECT e.position, e.stream, e.type, e.event_key, e.recorded_at, e.data, e.metadata,
       (SELECT jsonb_build_object('received_at', d.received_at, 'headers', d.headers, 'body', d.body)
        FROM deliveries d WHERE d.position = e.position) AS delivery
FROM events e WHERE e.position = %(position)s;

-- jobs_changed_since --
-- Jobs whose projection changed after a moment: the change feed where LISTEN is unavailable.
-- Asked of the events (BRIN on recorded_at): a job's updated_at is its latest event's time.
SELECT stream AS id, max(recorded_at) AS updated_at FROM events
WHERE recorded_at > %(since)s AND stream_job_id(stream) IS NOT NULL
GROUP BY stream
ORDER BY updated_at
LIMIT %(limit)s;

-- jobs_feed_listen --
-- A change feed listens on jobs_changed for the next %(seconds)s seconds: the trigger notifies until then.
SELECT jobs_feed_listen(%(seconds)s);

-- metrics_queue --
-- Tasks queued or running by kind, and how long the oldest ready one (run_after passed) has waited.
SELECT kind, status, count(*) AS n,
       extract(epoch FROM now() - min(run_after) FILTER (WHERE status = 'queued' AND run_after <= now()))
           AS oldest_ready_seconds
FROM tasks WHERE status IN ('queued', 'running') GROUP BY kind, status ORDER BY kind, status;

-- metrics_replay --
-- Replays running now: each names its phase in application_name
-- (rjs-replay:scope:n:phases:name:started, started in Unix seconds).
SELECT application_name,
       extract(epoch FROM now()) - coalesce(nullif(split_part(application_name, ':', 6), '')::numeric,
                                            extract(epoch FROM backend_start)) AS seconds
FROM pg_stat_activity WHERE application_name LIKE 'rjs-replay:%%';

-- newest_position --
-- The newest event's position (0 when there is none): for /metrics, and a replay's watermark.
SELECT coalesce(max(position), 0) AS position FROM events;

-- readiness --
-- Readiness: the migrations recorded as applied.
SELECT version FROM schema_migrations;

-- latest_retry --
-- A job's latest retry round (its number: how many it has had, as retry_job numbers them)
-- and the slots (prediction_id, step, index) it submitted again; no row before its first.
-- A partial index finds job.retried events.
SELECT (data ->> 'retry')::integer AS retry, data -> 'slots' AS slots
FROM events
WHERE stream = %(stream)s AND type = 'job.retried'
  AND position BETWEEN %(lo)s::bigint AND %(hi)s::bigint
ORDER BY position DESC LIMIT 1;

-- retryable_predictions --
-- A job's predictions a retry submits again: failed, canceled or aborted, and not already
-- retried; each with its step and its index in that step, from the event that submitted it
-- (or the refusal that stands in for it). An index no event records (a prediction adopted
-- from elsewhere) is numbered past any a job can have. Its events within its positions
-- (job_positions).
SELECT p.id, coalesce(p.step, 1) AS step,
       coalesce(s.index, 100000 + row_number() OVER (ORDER BY p.id))::integer AS index
FROM predictions p
LEFT JOIN LATERAL (
    SELECT small_int(e.data ->> 'index') AS index FROM events e
    WHERE e.stream = p.job_id::text AND e.position BETWEEN %(lo)s::bigint AND %(hi)s::bigint
      AND e.type IN ('prediction.submitted', 'prediction.submit_failed')
      AND coalesce(e.data -> 'prediction' ->> 'id', e.data ->> 'prediction_id') = p.id
    ORDER BY e.position LIMIT 1) s ON true
WHERE p.job_id = %(job_id)s::uuid AND NOT p.superseded AND p.status IN ('failed', 'canceled', 'aborted')
ORDER BY 2, 3, 1;

-- retry_candidates --
-- Finished jobs a bulk retry takes: by status, finished since a time, by model (or
-- deployment or version), and by error text, when given; with something to retry. Oldest first.
SELECT j.id::text AS id, j.status, j.model, j.error, j.completed_at
FROM jobs j
WHERE j.status = %(status)s::text
  AND (%(since)s::timestamptz IS NULL OR j.completed_at >= %(since)s::timestamptz)
  AND (%(model)s::text IS NULL OR %(model)s::text IN (j.model, j.deployment, j.version))
  AND (%(error)s::text IS NULL OR EXISTS (
      SELECT FROM predictions p WHERE p.job_id = j.id AND NOT p.superseded
        AND p.status IN ('failed', 'canceled', 'aborted')
        AND strpos(lower(coalesce(p.error, '') || ' ' || coalesce(j.error, '')), lower(%(error)s::text)) > 0))
  AND EXISTS (SELECT FROM predictions p WHERE p.job_id = j.id AND NOT p.superseded
              AND p.status IN ('failed', 'canceled', 'aborted'))
ORDER BY j.completed_at NULLS FIRST, j.id;

-- job_compute --
-- What some jobs' predictions ran, by job, model and version, for their cost (service/costs.py):
-- seconds is the sum of metrics.predict_time (missing or negative values left out, as in
-- job_history; anomalies counts the negative ones), timed the predictions that have one,
-- untimed those that started but have none, billable those that succeeded or have one.
-- Retried (superseded) predictions count: they ran.
SELECT job_id::text AS job_id, model, version,
       count(*) FILTER (WHERE status = 'succeeded')::integer AS succeeded,
       sum(history_predict_seconds(metrics)) AS seconds,
       count(history_predict_seconds(metrics))::integer AS timed,
       count(*) FILTER (WHERE history_predict_seconds(metrics) IS NULL AND started_at IS NOT NULL)::integer AS untimed,
       count(*) FILTER (WHERE status = 'succeeded' OR history_predict_seconds(metrics) IS NOT NULL)::integer AS billable,
       count(*) FILTER (WHERE jsonb_typeof(metrics -> 'predict_time') = 'number'
                          AND history_predict_seconds(metrics) IS NULL)::integer AS anomalies
FROM predictions
WHERE job_id = ANY (%(ids)s::uuid[])
GROUP BY job_id, model, version;
-- maintain_event_partitions --
-- Create the partitions of events the next appends need (sql/store.sql); the names created.
SELECT p AS partition FROM maintain_event_partitions() p;

-- maintain_delivery_partitions --
-- Create the delivery log's partitions for today and the next days (sql/store.sql).
SELECT p AS partition FROM maintain_delivery_partitions() p;

-- prune_deliveries --
-- Drop (or with dry_run, list) the delivery log's partitions older than the retention.
SELECT partition, day, bytes FROM prune_deliveries(%(days)s, %(dry_run)s, %(today)s);

-- last_prune --
-- When retention last ran (NULL: never).
SELECT max(ran_at) AS ran_at FROM store_upkeep WHERE action = 'prune';

-- dashboard_store --
-- The store's size on disk (events with its partitions, keys and indexes; the delivery log),
-- the delivery log's oldest day, and when retention last ran and what it freed.
SELECT ((SELECT coalesce(sum(bytes), 0) FROM event_partitions)
           + pg_total_relation_size('event_keys'))::bigint AS events_bytes,
       (SELECT coalesce(sum(bytes), 0) FROM delivery_partitions)::bigint AS deliveries_bytes,
       pg_database_size(current_database()) AS database_bytes,
       (SELECT min(received_at) FROM deliveries) AS deliveries_oldest,
       (SELECT count(*) FROM event_partitions WHERE to_position IS NOT NULL) AS event_partitions,
       u.ran_at AS pruned_at, u.dropped AS pruned, u.freed_bytes AS pruned_bytes
FROM (SELECT 1) one
LEFT JOIN LATERAL (SELECT ran_at, dropped, freed_bytes FROM store_upkeep WHERE action = 'prune'
                   ORDER BY id DESC LIMIT 1) u ON true;
