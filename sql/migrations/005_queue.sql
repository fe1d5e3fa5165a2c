-- A durable task queue in PostgreSQL for work that must not run inside a request:
-- submitting predictions to Replicate, canceling them, post-processing outputs.
--
-- A task is enqueued in the same transaction as the event that calls for it, so an
-- acknowledged request can never lose its follow-up work. Workers claim tasks with
-- FOR UPDATE SKIP LOCKED and hold a lease; a task whose worker died is claimed again
-- when its lease runs out. task_key makes enqueueing idempotent. The events a task
-- records carry their own idempotency keys, so a task that runs twice records once.
-- This is operational state, not a projection: replay neither reads nor rebuilds it.
-- The functions that enqueue, claim and finish tasks are in sql/queue.sql.

CREATE TABLE tasks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text        NOT NULL,
    task_key    text        NOT NULL,
    job_id      uuid,
    payload     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status      text        NOT NULL DEFAULT 'queued',
    attempts    integer     NOT NULL DEFAULT 0,
    max_attempts integer    NOT NULL DEFAULT 8,
    run_after   timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz,
    locked_by   text,
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tasks_task_key_unique UNIQUE (task_key),
    CONSTRAINT tasks_kind_known CHECK (kind IN ('submit_prediction', 'cancel_prediction', 'process_output')),
    CONSTRAINT tasks_status_known CHECK (status IN ('queued', 'running', 'done', 'failed')),
    CONSTRAINT tasks_payload_is_object CHECK (jsonb_typeof(payload) = 'object')
);

CREATE INDEX tasks_ready ON tasks (run_after, id) WHERE status = 'queued';
CREATE INDEX tasks_leased ON tasks (lease_until) WHERE status = 'running';
CREATE INDEX tasks_job ON tasks (job_id);
