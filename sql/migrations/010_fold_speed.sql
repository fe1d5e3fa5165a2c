-- job_activity: a job's per-event bookkeeping, kept apart from its jobs row.
--
-- Every event of a job would otherwise rewrite its jobs row (event_count, last_position,
-- updated_at), so each of Replicate's log webhooks (one every 500 ms per running
-- prediction) would be an UPDATE of jobs streamed to every Supabase Realtime subscriber,
-- costing a new row version with an entry in each index of jobs. Those three columns live
-- in job_activity instead: one narrow row per job stream, updated by every event, in no
-- publication, with only its primary key indexed (so its updates are HOT). jobs is updated
-- only when a derived column changes (touch_job in sql/fold.sql).

CREATE TABLE job_activity (
    job_id        uuid        PRIMARY KEY,
    event_count   integer     NOT NULL,
    last_position bigint      NOT NULL,
    updated_at    timestamptz NOT NULL   -- recorded_at of the job's latest event
) WITH (fillfactor = 70);  -- room on each page for the next versions of its rows (HOT)

COMMENT ON TABLE job_activity IS
    'Per job stream: how many events, the latest position and its time. A projection like '
    'jobs (rebuilt by replay), kept apart so that a log webhook does not rewrite jobs.';

-- Row-level security as for every table (009); its privileges are in sql/supabase_security.sql.
ALTER TABLE job_activity ENABLE ROW LEVEL SECURITY;

-- updated_at was indexed twice; its indexes go with it. The reconciler and the dashboard's
-- stuck-job panel ask for unfinished jobs, which are few: an index on them keyed by what
-- never changes finds them, and their job_activity row says how quiet each is. The change
-- feed's polling fallback (jobs_changed_since) asks the events, by their BRIN index on
-- recorded_at.
DROP INDEX jobs_updated_at;
DROP INDEX jobs_unfinished_updated_at;
CREATE INDEX jobs_unfinished ON jobs (created_at)
    WHERE status IN ('pending', 'queued', 'running', 'processing');

ALTER TABLE jobs DROP COLUMN event_count, DROP COLUMN last_position, DROP COLUMN updated_at;
