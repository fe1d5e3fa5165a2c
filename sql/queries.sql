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
