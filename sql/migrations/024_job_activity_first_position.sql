-- job_activity.first_position: where a job's events begin (its job.created's position),
-- beside last_position, where they end.
--
-- A read of one job's events (sql/queries.sql: job_positions) reads its two bounds first.
-- The lower one came from the job.created's key in event_keys, which holds a key for every
-- event: at 20M events its index is a level deeper than job_activity's (a row per job), and
-- a cold read paid those blocks from disk. Both bounds now come from the job's one
-- job_activity row. touch_job (sql/fold.sql) writes it from job.created, the rebuild from
-- the same event (sql/rebuild.sql); NULL while a job has events but no job.created yet.
--
-- The backfill reads every job.created's key once: a few seconds per million jobs, with
-- the job_activity rows it writes locked until the migration commits (an append to one of
-- those jobs waits for it; docs/deploy.md).
ALTER TABLE job_activity ADD COLUMN first_position bigint;

UPDATE job_activity a SET first_position = k.position
FROM event_keys k
WHERE k.event_key = 'created:' || a.job_id::text;
