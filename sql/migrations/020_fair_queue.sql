-- A fair queue (issue 20): tasks are claimed round-robin across the owners of their jobs,
-- with optional per-owner limits. The functions that use these columns are in sql/queue.sql.
--
-- owner_key  the job's owner (jobs.owner_id) when the task was enqueued; the nil uuid for a
--            job with no owner, which is one more owner. Not null, so one btree serves both.
-- fair_rank  the task's place in virtual time (enqueue_task): an owner with nothing waiting
--            enters just ahead of the front of the queue, each next task of the same owner
--            and kind two after its previous one. Claims take the lowest rank (ties: the
--            oldest id), so owners alternate instead of waiting behind a batch.
-- held_by    why a queued task is held back by an owner limit ('running': the owner has
--            OWNER_MAX_RUNNING predictions in flight; 'rate': OWNER_RATE_LIMIT_PER_MINUTE
--            creates in the last minute); its run_after says until when. NULL otherwise.

ALTER TABLE tasks
    ADD COLUMN owner_key uuid   NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',
    ADD COLUMN fair_rank bigint NOT NULL DEFAULT 0,
    ADD COLUMN held_by   text,
    ADD CONSTRAINT tasks_held_by_known CHECK (held_by IN ('running', 'rate'));

-- Tasks still to run keep their job's owner; finished ones need none.
UPDATE tasks t SET owner_key = j.owner_id
FROM jobs j
WHERE j.id = t.job_id AND j.owner_id IS NOT NULL AND t.status IN ('queued', 'running');

-- The claim: lowest rank first among the queued tasks.
CREATE INDEX tasks_fair ON tasks (fair_rank, id) WHERE status = 'queued';
-- An owner's line: its last rank (enqueue), its held tasks (hold, release).
CREATE INDEX tasks_owner_queued ON tasks (owner_key, kind, fair_rank) WHERE status = 'queued';
-- An owner's recent creates (OWNER_RATE_LIMIT_PER_MINUTE) and creates in progress.
CREATE INDEX tasks_owner_submits ON tasks (owner_key, updated_at) WHERE kind = 'submit_prediction';
