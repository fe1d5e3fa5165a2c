-- A durable task queue in PostgreSQL for work that must not run inside a request:
-- submitting predictions to Replicate, canceling them, post-processing outputs.
--
-- A task is enqueued in the same transaction as the event that calls for it, so an
-- acknowledged request can never lose its follow-up work. Workers claim tasks with
-- FOR UPDATE SKIP LOCKED and hold a lease; a task whose worker died is claimed again
-- when its lease runs out. task_key makes enqueueing idempotent. The events a task
-- records carry their own idempotency keys, so a task that runs twice records once.
-- This is operational state, not a projection: replay neither reads nor rebuilds it.

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

-- Wake sleeping workers when the enqueueing transaction commits. Workers also poll,
-- because NOTIFY does not pass a transaction-mode pooler.
CREATE FUNCTION tasks_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tasks', NEW.kind);
    RETURN NULL;
END $$;

CREATE TRIGGER tasks_notify_insert AFTER INSERT ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_notify();

-- Enqueue once per task_key; returns the task id, new or existing.
CREATE FUNCTION enqueue_task(
    p_kind text, p_task_key text, p_job_id uuid, p_payload jsonb,
    p_run_after timestamptz DEFAULT now(), p_max_attempts integer DEFAULT 8
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO tasks (kind, task_key, job_id, payload, run_after, max_attempts)
    VALUES (p_kind, p_task_key, p_job_id, coalesce(p_payload, '{}'::jsonb), p_run_after, p_max_attempts)
    ON CONFLICT (task_key) DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        SELECT id INTO v_id FROM tasks WHERE task_key = p_task_key;
    END IF;
    RETURN v_id;
END $$;

-- Claim the next runnable task of the given kinds: one whose lease ran out (its worker
-- died) first, else the oldest ready one. Every claim counts as an attempt.
CREATE FUNCTION claim_task(p_worker text, p_lease_seconds integer, p_kinds text[])
RETURNS SETOF tasks
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    SELECT id INTO v_id FROM tasks
    WHERE status = 'running' AND lease_until < now() AND kind = ANY (p_kinds)
    ORDER BY lease_until LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF v_id IS NULL THEN
        SELECT id INTO v_id FROM tasks
        WHERE status = 'queued' AND run_after <= now() AND kind = ANY (p_kinds)
        ORDER BY run_after, id LIMIT 1 FOR UPDATE SKIP LOCKED;
    END IF;
    IF v_id IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE tasks SET status = 'running', attempts = attempts + 1, locked_by = p_worker,
                     lease_until = now() + make_interval(secs => p_lease_seconds), updated_at = now()
    WHERE id = v_id
    RETURNING *;
END $$;

-- Finish a claimed task. Each returns false when the worker no longer holds the lease
-- (another worker took the task over), so the caller can tell.
CREATE FUNCTION finish_task(p_id bigint, p_worker text, p_status text, p_error text DEFAULT NULL,
                            p_retry_in_seconds double precision DEFAULT 0)
RETURNS boolean
LANGUAGE sql AS $$
    UPDATE tasks SET
        status      = p_status,
        last_error  = coalesce(p_error, last_error),
        run_after   = CASE WHEN p_status = 'queued'
                           THEN now() + make_interval(secs => p_retry_in_seconds) ELSE run_after END,
        lease_until = NULL,
        locked_by   = NULL,
        updated_at  = now()
    WHERE id = p_id AND locked_by = p_worker AND status = 'running'
    RETURNING true;
$$;

-- Give a task back without counting the attempt (a worker shutting down).
CREATE FUNCTION release_task(p_id bigint, p_worker text) RETURNS boolean
LANGUAGE sql AS $$
    UPDATE tasks SET status = 'queued', attempts = greatest(attempts - 1, 0), lease_until = NULL,
                     locked_by = NULL, updated_at = now()
    WHERE id = p_id AND locked_by = p_worker AND status = 'running'
    RETURNING true;
$$;

CREATE FUNCTION extend_lease(p_id bigint, p_worker text, p_lease_seconds integer) RETURNS boolean
LANGUAGE sql AS $$
    UPDATE tasks SET lease_until = now() + make_interval(secs => p_lease_seconds), updated_at = now()
    WHERE id = p_id AND locked_by = p_worker AND status = 'running'
    RETURNING true;
$$;
