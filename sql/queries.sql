-- Named queries, looked up by name from Python (service/db.py: queries["name"]).
-- A `-- name --` line starts each block; the line after it says what the block does.

-- append_event --
-- Record one event and fold it into the projections; a duplicate key changes nothing.
SELECT event_position AS position, duplicate
FROM append_event(%(event_key)s, %(stream)s, %(type)s, %(data)s, %(metadata)s);

-- event_count --
-- How many events a rebuild of all streams, or of one, reads.
SELECT count(*) AS n FROM events WHERE %(stream)s::text IS NULL OR stream = %(stream)s;

-- lock_events_for_replay --
-- A full replay makes appends wait until it commits (they take ROW EXCLUSIVE).
LOCK TABLE events IN SHARE MODE;

-- lock_stream --
-- The same lock append_event takes for a stream: a one-job replay makes that job's appends wait.
SELECT pg_advisory_xact_lock(hashtextextended(%(stream)s, 0));

-- job_events --
-- A job's events in recording order.
SELECT position, type, event_key, recorded_at, data, metadata
FROM events WHERE stream = %(stream)s ORDER BY position;

-- database_ok --
-- Health check: the database answers and the schema is there.
SELECT (SELECT count(*) FROM schema_migrations) AS migrations;

-- recent_jobs --
-- The newest jobs for the dashboard list.
SELECT id, model, version, aspect_ratio, status, predictions_expected, predictions_succeeded,
       predictions_failed, outputs_expected, outputs_processed, created_at, updated_at, error
FROM jobs ORDER BY created_at DESC, id DESC LIMIT %(limit)s;

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
-- Lease the next runnable task of these kinds to this worker.
SELECT * FROM claim_task(%(worker)s, %(lease)s, %(kinds)s::text[]);

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

-- append_webhook --
-- Record one verified Replicate webhook under its webhook-id, in its job's stream.
SELECT event_position AS position, duplicate, stream
FROM append_webhook(%(webhook_id)s, %(job)s, %(body)s, %(metadata)s);
