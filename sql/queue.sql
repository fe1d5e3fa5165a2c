-- The durable task queue's functions (the tasks table: migration 005): enqueue once per
-- key, claim with a lease, finish, release, extend. A task is enqueued in the same
-- transaction as the event that calls for it (on_event_applied, at the end of this file),
-- so an acknowledged request can never lose its follow-up work. Workers claim tasks with
-- FOR UPDATE SKIP LOCKED and hold a lease; a task whose worker died is claimed again when
-- its lease runs out.
--
-- Re-applied as a whole by `flask --app service migrate` whenever this file changes (see
-- docs/sql.md): every statement here must be safe to run again.

-- Wake sleeping workers when the enqueueing transaction commits. Workers also poll,
-- because NOTIFY does not pass a transaction-mode pooler.
CREATE OR REPLACE FUNCTION tasks_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tasks', NEW.kind);
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER tasks_notify_insert AFTER INSERT ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_notify();

-- Enqueue once per task_key; returns the task id, new or existing.
CREATE OR REPLACE FUNCTION enqueue_task(
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
CREATE OR REPLACE FUNCTION claim_task(p_worker text, p_lease_seconds integer, p_kinds text[])
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
CREATE OR REPLACE FUNCTION finish_task(p_id bigint, p_worker text, p_status text, p_error text DEFAULT NULL,
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
CREATE OR REPLACE FUNCTION release_task(p_id bigint, p_worker text) RETURNS boolean
LANGUAGE sql AS $$
    UPDATE tasks SET status = 'queued', attempts = greatest(attempts - 1, 0), lease_until = NULL,
                     locked_by = NULL, updated_at = now()
    WHERE id = p_id AND locked_by = p_worker AND status = 'running'
    RETURNING true;
$$;

CREATE OR REPLACE FUNCTION extend_lease(p_id bigint, p_worker text, p_lease_seconds integer) RETURNS boolean
LANGUAGE sql AS $$
    UPDATE tasks SET lease_until = now() + make_interval(secs => p_lease_seconds), updated_at = now()
    WHERE id = p_id AND locked_by = p_worker AND status = 'running'
    RETURNING true;
$$;


-- Work the live fold calls for ---------------------------------------------------------------
-- Enqueued in the transaction that records the event (apply_event in sql/fold.sql calls
-- on_event_applied on the live path only, never during a rebuild):
--   * a prediction of a job that has succeeded with outputs: one process_output task per
--     output URL, keyed process:<prediction>:<index>, so repeats of the news enqueue once;
--   * a two-step job whose first step is done: the second step's submission, once.

CREATE OR REPLACE FUNCTION on_event_applied(e events) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := stream_job_id(e.stream);
BEGIN
    IF v_job IS NULL THEN
        RETURN;  -- orphans have no job: no aspect ratio, nothing to post-process
    END IF;
    IF e.type IN ('replicate.webhook', 'replicate.polled') THEN
        PERFORM enqueue_task('process_output', format('process:%s:%s', p.id, u.ordinality - 1), v_job,
                             jsonb_build_object('prediction_id', p.id, 'index', u.ordinality - 1,
                                                'source_url', u.url, 'step', coalesce(p.step, 1)))
        FROM predictions p
        JOIN jobs j ON j.id = p.job_id
        CROSS JOIN LATERAL jsonb_array_elements_text(p.output_urls) WITH ORDINALITY AS u(url, ordinality)
        WHERE p.id = prediction_body(e.type, e.data) ->> 'id'
          AND p.status = 'succeeded' AND j.status <> 'canceled';
    ELSIF e.type IN ('output.processed', 'output.failed') THEN
        PERFORM enqueue_task('submit_prediction', format('submit:%s:2:0', j.id), j.id,
                             jsonb_build_object('step', 2, 'index', 0))
        FROM jobs j
        LEFT JOIN job_step_rollups r1 ON r1.job_id = j.id AND r1.step = 1
        LEFT JOIN job_step_output_rollups o1 ON o1.job_id = j.id AND o1.step = 1
        WHERE j.id = v_job AND j.next_step IS NOT NULL AND j.status <> 'canceled'
          -- step 1 needs all of predictions_expected but step 2's one
          AND job_step_state(j.predictions_expected - 1, coalesce(r1.submitted, 0), coalesce(r1.started, 0),
                             coalesce(r1.succeeded, 0), coalesce(r1.failed, 0),
                             coalesce(r1.outputs_expected, 0), coalesce(o1.processed, 0),
                             coalesce(o1.failed, 0)) = 'done';
    END IF;
END $$;
