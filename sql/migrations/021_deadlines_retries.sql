-- Issue 20 (parts 3-5): deadlines, retries.
--
-- jobs.deadline: when a job with cancel_after must be over (job.created's recorded_at plus
-- its cancel_after seconds; job_facts in sql/fold.sql derives it). The submitter sends each
-- prediction the time left as Replicate's Cancel-After header, and sends nothing after it.
ALTER TABLE jobs ADD COLUMN deadline timestamptz;

-- predictions.superseded: a failed, canceled or aborted prediction that a retry (a
-- job.retried event naming it) submitted again. It stays in the job's history but no
-- longer counts in the job's progress or status (job_step_rollups_rows in sql/fold.sql).
ALTER TABLE predictions ADD COLUMN superseded boolean NOT NULL DEFAULT false;

-- A new event type: job.retried, one per retry round of a job. The rule is a call of an
-- IMMUTABLE PL/pgSQL function, as migration 011 made it (an IN list in the constraint is
-- parsed again by every INSERT into events; a call is short to parse). A new function
-- rather than is_event_type redefined: a function is created in one place, and a CHECK's
-- function must not change under rows it has already passed. is_event_type is then unused.
CREATE FUNCTION is_known_event_type(type text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN type IN ('job.created', 'job.canceled', 'job.retried',
                    'prediction.submitted', 'prediction.submit_failed',
                    'replicate.webhook', 'replicate.polled',
                    'output.processed', 'output.failed');
END $$;

ALTER TABLE events DROP CONSTRAINT events_type_known,
    ADD CONSTRAINT events_type_known CHECK (is_known_event_type(type));
DROP FUNCTION is_event_type(text);

-- A rebuild finds every retry without reading all events: retries are rare.
CREATE INDEX events_job_retried ON events (stream) WHERE type = 'job.retried';
